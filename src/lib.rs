//! genai-task-exporter: a Prometheus exporter for asynchronous image and video generation
//! tasks on AI gateway APIs (maxapi.io, apimall.ai).
//!
//! Data flows one way: `config` -> `discovery` / `http` feed the `registry`; the `poller`
//! asks `providers` (through `upstream`) and applies what it learns to the `registry`;
//! the `registry` emits events that move the `metrics`; `http` serves them.

pub mod providers;
pub mod simulator;
pub mod task;
