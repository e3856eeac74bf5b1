//! Completion times learnt per model: how long tasks of each model took from creation to
//! completion, as a small decayed histogram, so that polls go where completions are likely
//! (`schedule`).
//!
//! Every terminal observation that carries both `created_at` and `completed_at` is a sample,
//! whatever brought it (poll, history, callback), once per task (when its outcome is
//! counted). A sample is added to its model's histogram and to the provider's pooled one,
//! kept under the model index 0 (`unknown`): a task is scheduled by the pooled distribution
//! until its first answer tells its model. There is one histogram per model of the bounded
//! model table, so memory stays bounded (about 0.5 KiB each).
//!
//! Old samples fade: each new sample multiplies the weights already there by [`DECAY`], so
//! the last few hundred completions dominate and a model that gets slower is followed.
//! The histograms are stored (one row per model, committed with the counters) and read back
//! at start-up.

/// Buckets: `[0, FLOOR_MS)`, then log-spaced by [`RATIO`] up to about 25 hours.
const BUCKETS: usize = 128;
const FLOOR_MS: f64 = 500.0;
/// 10 % wide buckets: quantiles are read with that resolution.
const RATIO: f64 = 1.1;
/// Weight kept by the existing samples at each new one: a half-life of about 280 samples.
const DECAY: f32 = 1.0 - 1.0 / 400.0;
/// A bucket whose share of the weight fell below this is emptied, so that an old outlier
/// does not stay "the longest sample" for ever.
const NEGLIGIBLE_SHARE: f64 = 1e-4;
/// The learned schedule is used once a distribution holds this many samples.
pub(super) const MIN_SAMPLES: u32 = 20;
/// First byte of a stored histogram.
const FORMAT: u8 = 1;

/// Lower bound (ms) of bucket `i`.
fn lower_ms(i: usize) -> f64 {
    if i == 0 {
        0.0
    } else {
        FLOOR_MS * RATIO.powi(i as i32 - 1)
    }
}

fn upper_ms(i: usize) -> f64 {
    FLOOR_MS * RATIO.powi(i as i32)
}

fn bucket_of(ms: f64) -> usize {
    if ms < FLOOR_MS {
        return 0;
    }
    let i = ((ms / FLOOR_MS).ln() / RATIO.ln()).floor() as usize + 1;
    i.min(BUCKETS - 1)
}

/// One model's completion-time distribution.
#[derive(Debug, Clone)]
pub(super) struct Histogram {
    weights: [f32; BUCKETS],
    /// Samples ever added (saturating): whether there are enough to trust the quantiles.
    samples: u32,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            weights: [0.0; BUCKETS],
            samples: 0,
        }
    }
}

impl Histogram {
    pub(super) fn add(&mut self, duration_ms: i64) {
        let negligible = (self.total() * NEGLIGIBLE_SHARE) as f32;
        for w in &mut self.weights {
            *w *= DECAY;
            if *w < negligible {
                *w = 0.0;
            }
        }
        self.weights[bucket_of(duration_ms.max(0) as f64)] += 1.0;
        self.samples = self.samples.saturating_add(1);
    }

    #[cfg(test)]
    pub(super) fn samples(&self) -> u32 {
        self.samples
    }

    /// Whether the quantiles are worth following.
    pub(super) fn is_trusted(&self) -> bool {
        self.samples >= MIN_SAMPLES && self.total() > 0.0
    }

    fn total(&self) -> f64 {
        self.weights.iter().map(|&w| f64::from(w)).sum()
    }

    /// Upper end (ms) of the longest duration seen (still weighing anything).
    pub(super) fn longest_ms(&self) -> f64 {
        self.weights
            .iter()
            .rposition(|&w| w > 0.0)
            .map_or(0.0, upper_ms)
    }

    /// Share of the mass below `ms` (0 to 1), interpolated within its bucket.
    pub(super) fn cdf(&self, ms: f64) -> f64 {
        let total = self.total();
        if total <= 0.0 {
            return 0.0;
        }
        let i = bucket_of(ms.max(0.0));
        let below: f64 = self.weights[..i].iter().map(|&w| f64::from(w)).sum();
        let (lo, hi) = (lower_ms(i), upper_ms(i));
        let within = ((ms - lo) / (hi - lo)).clamp(0.0, 1.0);
        ((below + f64::from(self.weights[i]) * within) / total).min(1.0)
    }

    /// Duration (ms) below which a share `q` of the mass lies, interpolated within its
    /// bucket (linearly: the buckets are narrow).
    pub(super) fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.total();
        let target = q.clamp(0.0, 1.0) * total;
        let mut below = 0.0;
        for (i, &w) in self.weights.iter().enumerate() {
            let w = f64::from(w);
            if w > 0.0 && below + w >= target {
                let within = ((target - below) / w).clamp(0.0, 1.0);
                return lower_ms(i) + within * (upper_ms(i) - lower_ms(i));
            }
            below += w;
        }
        self.longest_ms()
    }

    /// The stored form: format, samples, then (bucket, weight) of the non-empty buckets.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 5 * 32);
        out.push(FORMAT);
        out.extend_from_slice(&self.samples.to_le_bytes());
        for (i, &w) in self.weights.iter().enumerate() {
            if w > 0.0 {
                out.push(i as u8);
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Reads [`encode`](Self::encode)'s form; `None` for anything else.
    pub(super) fn decode(bytes: &[u8]) -> Option<Histogram> {
        let (&format, rest) = bytes.split_first()?;
        if format != FORMAT || rest.len() < 4 || (rest.len() - 4) % 5 != 0 {
            return None;
        }
        let mut h = Histogram {
            samples: u32::from_le_bytes(rest[..4].try_into().ok()?),
            ..Histogram::default()
        };
        for entry in rest[4..].chunks_exact(5) {
            let i = entry[0] as usize;
            let w = f32::from_le_bytes(entry[1..].try_into().ok()?);
            if i >= BUCKETS || !w.is_finite() || w < 0.0 {
                return None;
            }
            h.weights[i] = w;
        }
        Some(h)
    }
}

/// The histograms of one provider, by model index (0: every model pooled), and which ones
/// changed since the persister last took them.
#[derive(Debug, Default)]
pub(super) struct Latencies {
    by_model: Vec<Option<Box<Histogram>>>,
    changed: Vec<u16>,
}

impl Latencies {
    /// The distribution to schedule a task of `model` by, once trusted: its model's, or the
    /// pooled one while the model is unknown (index 0). A known model with too few samples
    /// of its own gets none (the back-off): the pooled times, dominated by other models,
    /// would misplace its polls.
    pub(super) fn for_model(&self, model: u16) -> Option<&Histogram> {
        self.by_model
            .get(model as usize)
            .and_then(Option::as_deref)
            .filter(|h| h.is_trusted())
    }

    /// Learns one completion: `duration_ms` from creation to completion.
    pub(super) fn learn(&mut self, model: u16, duration_ms: i64) {
        for i in [model, 0] {
            self.histogram_mut(i).add(duration_ms);
            if !self.changed.contains(&i) {
                self.changed.push(i);
            }
            if model == 0 {
                break;
            }
        }
    }

    fn histogram_mut(&mut self, model: u16) -> &mut Histogram {
        let i = model as usize;
        if self.by_model.len() <= i {
            self.by_model.resize_with(i + 1, || None);
        }
        self.by_model[i].get_or_insert_with(Box::default)
    }

    /// Puts back a stored histogram (start-up).
    pub(super) fn restore(&mut self, model: u16, histogram: Histogram) {
        *self.histogram_mut(model) = histogram;
    }

    /// The histograms changed since the last call, encoded, by model index.
    pub(super) fn take_changed(&mut self) -> Vec<(u16, Vec<u8>)> {
        let changed = std::mem::take(&mut self.changed);
        changed
            .into_iter()
            .filter_map(|i| {
                let h = self.by_model.get(i as usize)?.as_deref()?;
                Some((i, h.encode()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(from_ms: i64, to_ms: i64, n: i64) -> Histogram {
        // In a scrambled order: the decay favours the latest samples.
        let mut h = Histogram::default();
        for k in 0..n {
            let k = k * 7919 % n;
            h.add(from_ms + (to_ms - from_ms) * k / (n - 1));
        }
        h
    }

    #[test]
    fn quantiles_follow_the_samples_within_a_bucket() {
        let h = uniform(6_000, 30_000, 400);
        for (q, expected) in [(0.25, 12_000.0), (0.5, 18_000.0), (0.9, 27_600.0)] {
            let got = h.quantile_ms(q);
            assert!((got - expected).abs() < expected * 0.06, "p{q}: {got}");
            assert!((h.cdf(got) - q).abs() < 0.02, "cdf(p{q}) = {}", h.cdf(got));
        }
        assert!((30_000.0..33_000.0).contains(&h.longest_ms()));
        assert_eq!(h.cdf(0.0), 0.0);
        assert_eq!(h.cdf(40_000.0), 1.0);
    }

    #[test]
    fn old_samples_fade_and_the_distribution_follows() {
        let mut h = uniform(60_000, 70_000, 100);
        for _ in 0..3_000 {
            h.add(5_000);
        }
        assert!(h.quantile_ms(0.99) < 6_000.0, "{}", h.quantile_ms(0.99));
        assert!(
            h.longest_ms() < 6_000.0,
            "the old slow samples are forgotten"
        );
    }

    #[test]
    fn stored_form_round_trips_and_refuses_garbage() {
        let h = uniform(1_000, 200_000, 50);
        let back = Histogram::decode(&h.encode()).unwrap();
        assert_eq!(back.samples(), 50);
        assert_eq!(back.quantile_ms(0.5), h.quantile_ms(0.5));
        assert!(Histogram::decode(&[]).is_none());
        assert!(Histogram::decode(&[2, 0, 0, 0, 0]).is_none());
        let mut bad = h.encode();
        bad[5] = 200; // bucket index out of range
        assert!(Histogram::decode(&bad).is_none());
        bad.truncate(7);
        assert!(Histogram::decode(&bad).is_none());
    }

    #[test]
    fn a_model_is_learnt_with_the_pooled_distribution() {
        let mut l = Latencies::default();
        for _ in 0..MIN_SAMPLES - 1 {
            l.learn(3, 10_000);
        }
        assert!(l.for_model(3).is_none(), "too few samples");
        l.learn(0, 10_000); // model unknown: pooled only
        assert_eq!(l.for_model(0).unwrap().samples(), MIN_SAMPLES, "pooled");
        assert!(
            l.for_model(3).is_none(),
            "not the pooled times for a known model"
        );
        l.learn(3, 10_000);
        assert_eq!(l.for_model(3).unwrap().samples(), MIN_SAMPLES, "its own");
        assert_eq!(l.for_model(0).unwrap().samples(), MIN_SAMPLES + 1);
        let changed: Vec<u16> = l.take_changed().into_iter().map(|(i, _)| i).collect();
        assert_eq!(changed, vec![3, 0]);
        assert!(l.take_changed().is_empty());
    }
}
