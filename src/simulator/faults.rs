//! Per-request fault decisions: outage windows, the rate-limit token bucket and the injected
//! faults. Each provider has its own seeded generator so one provider's traffic does not
//! shift the other's faults.

use std::time::{Duration, Instant};

use super::config::Faults;

/// A request refused before it reaches the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Inside an outage window: 503.
    Outage,
    /// Token bucket empty: 429 with `Retry-After: 1`.
    RateLimited,
}

/// A fault injected into an admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injected {
    Error500,
    Error429,
    /// Hold the request for `timeout_delay`, then answer normally.
    Timeout,
    /// HTTP 200 with a broken body: the answer's JSON cut in half, or an HTML error page.
    Malformed {
        html: bool,
    },
}

pub(crate) struct FaultState {
    rng: fastrand::Rng,
    tokens: f64,
    refilled: Instant,
}

impl FaultState {
    pub(crate) fn new(seed: u64) -> Self {
        FaultState {
            rng: fastrand::Rng::with_seed(seed),
            tokens: f64::INFINITY,
            refilled: Instant::now(),
        }
    }

    /// Outage and rate limit, in that order (an outage answers before any gateway logic).
    pub(crate) fn refuse(&mut self, f: &Faults, uptime: Duration, now: Instant) -> Option<Refusal> {
        if f.outages
            .iter()
            .any(|o| uptime >= o.start && uptime < o.start.saturating_add(o.duration))
        {
            return Some(Refusal::Outage);
        }
        let rps = f.rate_limit_rps.filter(|r| r.is_finite() && *r > 0.0)?;
        // Burst of one second's worth (at least one request).
        let burst = rps.max(1.0);
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rps).min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Refusal::RateLimited)
        }
    }

    /// One draw per admitted request, so the fault sequence depends only on the request count.
    pub(crate) fn inject(&mut self, f: &Faults) -> Option<Injected> {
        let ratio = |v: f64| {
            if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let x = self.rng.f64();
        let mut edge = ratio(f.error_500_ratio);
        if x < edge {
            return Some(Injected::Error500);
        }
        edge += ratio(f.error_429_ratio);
        if x < edge {
            return Some(Injected::Error429);
        }
        edge += ratio(f.timeout_ratio);
        if x < edge {
            return Some(Injected::Timeout);
        }
        edge += ratio(f.malformed_ratio);
        if x < edge {
            return Some(Injected::Malformed {
                html: self.rng.bool(),
            });
        }
        None
    }
}

/// What a proxy in front of a dead upstream typically sends with HTTP 200 by mistake.
pub(crate) const HTML_ERROR_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::config::Outage;

    #[test]
    fn bucket_allows_burst_then_refills() {
        let f = Faults {
            rate_limit_rps: Some(5.0),
            ..Faults::default()
        };
        let mut s = FaultState::new(1);
        let t0 = Instant::now();
        let allowed = (0..10)
            .filter(|_| s.refuse(&f, Duration::ZERO, t0).is_none())
            .count();
        assert_eq!(allowed, 5);
        let t1 = t0 + Duration::from_millis(400);
        assert_eq!(s.refuse(&f, Duration::ZERO, t1), None);
        assert_eq!(s.refuse(&f, Duration::ZERO, t1), None);
        assert_eq!(s.refuse(&f, Duration::ZERO, t1), Some(Refusal::RateLimited));
    }

    #[test]
    fn outage_window_is_half_open() {
        let f = Faults {
            outages: vec![Outage {
                start: Duration::from_secs(2),
                duration: Duration::from_secs(1),
            }],
            ..Faults::default()
        };
        let mut s = FaultState::new(1);
        let now = Instant::now();
        assert_eq!(s.refuse(&f, Duration::from_millis(1999), now), None);
        assert_eq!(
            s.refuse(&f, Duration::from_secs(2), now),
            Some(Refusal::Outage)
        );
        assert_eq!(s.refuse(&f, Duration::from_secs(3), now), None);
    }

    #[test]
    fn injection_is_repeatable_and_roughly_proportional() {
        let f = Faults {
            error_500_ratio: 0.1,
            malformed_ratio: 0.05,
            ..Faults::default()
        };
        let run = |seed| {
            let mut s = FaultState::new(seed);
            (0..10_000).map(|_| s.inject(&f)).collect::<Vec<_>>()
        };
        let a = run(5);
        assert_eq!(a, run(5));
        let e500 = a.iter().filter(|x| **x == Some(Injected::Error500)).count();
        let bad = a
            .iter()
            .filter(|x| matches!(x, Some(Injected::Malformed { .. })))
            .count();
        assert!((850..1150).contains(&e500), "{e500}");
        assert!((400..600).contains(&bad), "{bad}");
    }
}
