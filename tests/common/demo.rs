//! The `demo` subcommand as a user runs it: the real binary on free loopback ports.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `genai-task-exporter demo`: simulated providers and the exporter, on loopback ports.
pub struct Demo {
    child: Child,
    pub metrics_url: String,
    pub landing_url: String,
    stderr_file: tempfile::NamedTempFile,
}

impl Demo {
    /// Starts the demo on free ports and waits for it to print its URLs.
    pub fn start() -> Demo {
        let stderr = tempfile::NamedTempFile::new().expect("temp file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_genai-task-exporter"))
            .args([
                "demo",
                "--web.listen-address",
                "127.0.0.1:0",
                "--simulator.listen-address",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().expect("temp file"))
            .spawn()
            .expect("start genai-task-exporter demo");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading to the end, so the demo never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut demo = Demo {
            child,
            metrics_url: String::new(),
            landing_url: String::new(),
            stderr_file: stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = String::new();
        while demo.metrics_url.is_empty() || demo.landing_url.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = url_after(&line, "metrics:") {
                        demo.metrics_url = url;
                    }
                    if let Some(url) = url_after(&line, "landing page:") {
                        demo.landing_url = url;
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(e) => {
                    let how = match e {
                        mpsc::RecvTimeoutError::Timeout => "within 30 s".to_string(),
                        mpsc::RecvTimeoutError::Disconnected => {
                            format!("before it exited ({:?})", demo.child.wait())
                        }
                    };
                    panic!(
                        "the demo printed no metrics URL {how}; stdout:\n{seen}\nstderr:\n{}",
                        demo.stderr()
                    )
                }
            }
        }
        demo
    }

    /// What the demo logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_file.path()).unwrap_or_default()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The URL after `label` on a line like `  metrics:             http://127.0.0.1:PORT/metrics`.
pub fn url_after(line: &str, label: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix(label)?;
    let url = rest.split_whitespace().next()?;
    url.starts_with("http://").then(|| url.to_string())
}
