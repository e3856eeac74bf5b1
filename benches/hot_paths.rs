//! Micro-benchmarks of the hot paths: parsing task answers, applying answers to the registry,
//! taking the persistence work, and rendering `/metrics`.
//!
//! `cargo bench --bench hot_paths` (criterion; `-- --quick` for a short run).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use genai_task_exporter::config::{DEFAULT_LATENCY_BUCKETS, Polling, Shard};
use genai_task_exporter::metrics::{Metrics, Staged};
use genai_task_exporter::providers::{Adapter, FailureRules, apimall::Apimall, maxapi::Maxapi};
use genai_task_exporter::registry::{ProviderTasks, Registry, Source};
use genai_task_exporter::task::{Observation, Status};

const MAXAPI_TASK: &[u8] = include_bytes!("../tests/fixtures/providers/maxapi_query_task.json");
const APIMALL_TASK: &[u8] = include_bytes!("../tests/fixtures/providers/apimall_image_task.json");
const MODELS: [&str; 8] = [
    "nano-banana",
    "nano-banana-pro",
    "seedream-4",
    "flux-kontext-pro",
    "veo3-fast",
    "kling-2.1",
    "sora-2",
    "midjourney-v7",
];
const NOW: i64 = 1_780_000_000_000;

fn id(i: usize) -> String {
    format!("{:08x}-d1e5-4d11-9f3a-{:012x}", i as u32, i as u64 * 7919)
}

fn polling() -> Polling {
    Polling {
        interval: Duration::from_secs(15),
        max_interval: Duration::from_secs(300),
        max_task_age: Duration::from_secs(100 * 24 * 3600),
        ..Polling::default()
    }
}

fn running(id: &str, i: usize) -> Observation {
    let mut o = Observation::new(id, Status::Running, "PROCESSING");
    o.model = Some(MODELS[i % MODELS.len()].to_string());
    o.created_at = Some(NOW - 60_000);
    o.updated_at = Some(NOW - 1_000);
    o
}

/// A registry with `n` running tasks over eight models, persistence work taken.
fn registry_with(n: usize) -> (Arc<Registry>, Arc<ProviderTasks>) {
    let registry = Arc::new(Registry::new(50, Shard::default()));
    let tasks = registry.provider_or_insert("maxapi", &polling());
    for i in 0..n {
        let id = id(i);
        tasks.track(&id, Source::Api, NOW);
        tasks.observe(&running(&id, i), NOW);
        if i % 10_000 == 0 {
            drop(tasks.take_pending());
        }
    }
    drop(tasks.take_pending());
    (registry, tasks)
}

fn parse(c: &mut Criterion) {
    let maxapi = Adapter::Maxapi(Maxapi::new());
    let apimall = Adapter::Apimall(Apimall::new(FailureRules::default()));
    let mut g = c.benchmark_group("parse_task");
    g.bench_function("maxapi", |b| {
        b.iter(|| maxapi.parse_task(200, black_box(MAXAPI_TASK)).unwrap())
    });
    g.bench_function("apimall", |b| {
        b.iter(|| apimall.parse_task(200, black_box(APIMALL_TASK)).unwrap())
    });
    g.finish();
}

fn registry(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry");
    let n = 100_000;
    let (_registry, tasks) = registry_with(n);
    let ids: Vec<String> = (0..n).map(id).collect();
    let answers: Vec<Observation> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| running(id, i))
        .collect();

    // The steady state of polling: an in-flight task answers "still running".
    let mut i = 0;
    g.bench_function("record_poll_running_100k", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            tasks.record_poll(&ids[i], Ok(&answers[i]), NOW + 1_000);
        })
    });
    drop(tasks.take_pending());

    let mut i = 0;
    g.bench_function("observe_running_100k", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            tasks.observe(&answers[i], NOW + 1_000)
        })
    });

    // A task's whole life: tracked, polled twice, finished, its work taken.
    let mut k = n;
    g.bench_function("track_poll_finish_take", |b| {
        b.iter_batched(
            || {
                k += 1;
                (k, id(k))
            },
            |(k, id)| {
                tasks.track(&id, Source::Api, NOW);
                tasks.record_poll(&id, Ok(&running(&id, k)), NOW + 1);
                let mut done = running(&id, k);
                done.status = Status::Succeeded;
                tasks.record_poll(&id, Ok(&done), NOW + 2);
                tasks.take_pending()
            },
            BatchSize::SmallInput,
        )
    });

    // Persistence work of 1,000 polled tasks (encoding 1,000 records: what a shutdown or
    // the once-a-minute bookkeeping write costs).
    g.bench_function("take_pending_all_1000_polled", |b| {
        b.iter_batched(
            || {
                for (j, answer) in answers.iter().enumerate().take(1_000) {
                    tasks.record_poll(&ids[j], Ok(answer), NOW + 2_000);
                }
            },
            |()| tasks.take_pending_all(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn render(c: &mut Criterion) {
    let mut g = c.benchmark_group("render_metrics");
    for n in [1_000, 100_000] {
        let (registry, tasks) = registry_with(n);
        let metrics = Metrics::new(DEFAULT_LATENCY_BUCKETS.to_vec());
        metrics.set_providers(&["maxapi".to_string()]);
        // Series: every model finishing with every terminal status, upstream codes.
        for (i, model) in MODELS.iter().enumerate() {
            for (j, status) in [
                Status::Succeeded,
                Status::Failed,
                Status::TimedOut,
                Status::Cancelled,
            ]
            .into_iter()
            .enumerate()
            {
                let id = format!("done-{i}-{j}");
                tasks.track(&id, Source::Static, NOW);
                let mut o = running(&id, i);
                o.model = Some(model.to_string());
                o.status = status;
                tasks.observe(&o, NOW + 90_000);
            }
        }
        for code in ["200", "404", "429", "500", "timeout"] {
            metrics.record_request("maxapi", "task", code, 0.1);
        }
        metrics.record_api_error("maxapi", "task", "invalid_response");
        let pending = tasks.take_pending();
        let mut staged = Staged::default();
        metrics
            .accounting
            .stage(&mut staged, "maxapi", &pending.events);
        metrics
            .accounting
            .stage_counts(&mut staged, metrics.take_pending_counts());
        metrics.accounting.publish(staged);
        g.bench_function(format!("{n}_tasks"), |b| {
            b.iter(|| metrics.render(&registry).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = parse, registry, render
}
criterion_main!(benches);
