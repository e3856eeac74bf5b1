//! genai-task-exporter: a Prometheus exporter for asynchronous image and video generation
//! tasks on AI gateway APIs (maxapi.io, apimall.ai).
//!
//! Data flows one way:
//! `config` -> `startup` binds the listener and builds the `app`, which starts, per
//! provider, a `poller`, the `discovery` sources and the `account` balance poll (each
//! restarted by `background` should it panic, each scheduled by the `clock`); they and
//! the `http` routes (registration API, webhooks) feed the `registry`. Every request to a
//! provider is one `upstream` call: permit, request, the adapter's (`providers`) reading of
//! the answer, outcome metrics. The poller records the normalized answer in the
//! `registry`, which decides what to count. The `persist`er commits those
//! counts to the `store` and then publishes them to `metrics`, which `http` serves.
//! `web` puts TLS, basic auth and response headers in front of the `http` router.
//!
//! `docs/architecture.md` maps every file. The binary, `tests/`, `benches/`, `examples/` and
//! `fuzz/` are the only users of what is `pub` here; everything else is `pub(crate)`.

pub(crate) mod account;
pub mod app;
pub(crate) mod background;
pub mod clock;
pub mod config;
pub mod demo;
pub(crate) mod discovery;
pub mod forward;
pub mod http;
pub mod logging;
pub mod metrics;
pub(crate) mod persist;
pub(crate) mod poller;
pub mod providers;
pub mod proxy;
pub mod registry;
pub mod reshard;
pub mod secret;
pub mod shard;
pub mod simulator;
pub mod startup;
pub mod store;
pub mod task;
pub mod upstream;
pub mod web;
