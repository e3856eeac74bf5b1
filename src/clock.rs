//! The time that drives scheduling: wall-clock milliseconds, either the system's or one
//! that advances with `tokio::time`, so timing tests can run on paused time.

use crate::task::{UnixMillis, now_millis};

/// Wall-clock milliseconds since the Unix epoch. Cheap to copy; pass it to whatever
/// schedules by `now`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some`: the wall time at `origin`, advanced by how far
    /// `tokio::time` moved since (which follows a paused, advanced test clock).
    tokio_origin: Option<(UnixMillis, tokio::time::Instant)>,
}

impl Clock {
    /// The system clock (production).
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that starts at the system time and then follows `tokio::time`: with
    /// `tokio::time::pause()`, it moves only when the test advances time.
    #[cfg(test)]
    pub(crate) fn tokio() -> Clock {
        Clock {
            tokio_origin: Some((now_millis(), tokio::time::Instant::now())),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub(crate) fn now_millis(&self) -> UnixMillis {
        match self.tokio_origin {
            None => now_millis(),
            Some((wall, origin)) => wall + origin.elapsed().as_millis() as UnixMillis,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_paused_time_only() {
        let clock = Clock::tokio();
        let start = clock.now_millis();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.now_millis(), start, "real time does not move it");
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now_millis(), start + 90_000);
    }
}
