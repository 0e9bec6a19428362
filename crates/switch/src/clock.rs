//! The switch's clock: the system clock in production, or a simulated one that only the
//! deterministic simulator moves (payment deadlines, timestamps, the engine's expiry clock).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

#[derive(Clone, Default)]
pub enum Clock {
    #[default]
    System,
    Simulated(SimClock),
}

/// Simulated time in ns since the Unix epoch; moves only by [`SimClock::advance`].
#[derive(Clone)]
pub struct SimClock {
    now: Arc<AtomicU64>,
    changed: Arc<watch::Sender<u64>>,
}

impl SimClock {
    pub fn new(start_ns: u64) -> SimClock {
        let (changed, _) = watch::channel(start_ns);
        SimClock {
            now: Arc::new(AtomicU64::new(start_ns)),
            changed: Arc::new(changed),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Moves time forward (never back) and wakes whoever waits for it.
    pub fn advance(&self, by_ns: u64) {
        let now = self
            .now
            .load(Ordering::SeqCst)
            .checked_add(by_ns)
            .expect("simulated time overflows");
        self.now.store(now, Ordering::SeqCst);
        self.changed.send_replace(now);
    }

    /// The same time as the engine reads it (`NodeOptions::clock`).
    pub fn shared(&self) -> Arc<AtomicU64> {
        self.now.clone()
    }
}

impl Clock {
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::System => now_ns(),
            Clock::Simulated(clock) => clock.now_ns(),
        }
    }

    /// Waits until the clock reads at least `at_ns`.
    pub async fn sleep_until_ns(&self, at_ns: u64) {
        match self {
            Clock::System => {
                let now = now_ns();
                tokio::time::sleep(Duration::from_nanos(at_ns.saturating_sub(now))).await
            }
            Clock::Simulated(clock) => {
                let mut receiver = clock.changed.subscribe();
                // The sender lives as long as the clock: waiting ends only by time.
                let _ = receiver.wait_for(|now| *now >= at_ns).await;
            }
        }
    }

    /// `future`'s output, or `None` when the clock reaches `at_ns` first.
    pub async fn timeout_at_ns<F: Future>(&self, at_ns: u64, future: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            output = future => Some(output),
            () = self.sleep_until_ns(at_ns) => None,
        }
    }
}

/// The system clock in nanoseconds since the Unix epoch (0 before it).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
