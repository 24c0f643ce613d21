//! Wall-clock time as the daemon reads it: the system's, or, in tests, one that moves only
//! when told to. Everything that compares with a durable time (time to live, the reaper,
//! request-id and event retention, record timestamps) reads it here, so tests advance it
//! instead of sleeping, and the periodic tasks that depend on it wake when it moves.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

/// Milliseconds since the Unix epoch at `at` (a time read from configuration, say); 0
/// before 1970.
pub fn epoch_ms(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// A clock; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    now_ms: AtomicI64,
    moved: tokio::sync::watch::Sender<i64>,
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that reads `start_ms` until [`Clock::advance`] moves it.
    pub fn manual(start_ms: i64) -> Self {
        let (moved, _) = tokio::sync::watch::channel(start_ms);
        Self { manual: Some(Arc::new(Manual { now_ms: AtomicI64::new(start_ms), moved })) }
    }

    /// A manual clock reading the system's time now.
    pub fn manual_from_now() -> Self {
        Self::manual(Self::system().now_ms())
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(manual) => manual.now_ms.load(Ordering::SeqCst),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default(),
        }
    }

    /// Moves a manual clock forward and wakes whoever waits in [`Clock::moved`]. A no-op
    /// on the system's clock, which moves by itself.
    pub fn advance(&self, by: Duration) {
        if let Some(manual) = &self.manual {
            let now = manual.now_ms.fetch_add(by.as_millis() as i64, Ordering::SeqCst) + by.as_millis() as i64;
            manual.moved.send_replace(now);
        }
    }

    /// Its moves from now on, for a periodic task to wait for beside its timer.
    pub fn moves(&self) -> Moves {
        Moves(self.manual.as_ref().map(|manual| manual.moved.subscribe()))
    }
}

/// The moves of a clock, as one waiter sees them: none is missed between two waits.
#[derive(Debug)]
pub struct Moves(Option<tokio::sync::watch::Receiver<i64>>);

impl Moves {
    /// Completes once a manual clock moved since the last call (or since [`Clock::moves`]);
    /// never for the system's clock.
    pub async fn moved(&mut self) {
        let moved = match &mut self.0 {
            Some(moves) => moves.changed().await.is_ok(),
            None => false,
        };
        if !moved {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_only_when_told_and_says_so() {
        let clock = Clock::manual(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        let mut moves = clock.moves();
        clock.advance(Duration::from_secs(2));
        // Seen even though it happened before the wait began.
        moves.moved().await;
        assert_eq!(clock.now_ms(), 3_000);
        let mut system_moves = Clock::system().moves();
        let never = tokio::time::timeout(Duration::from_millis(10), system_moves.moved()).await;
        assert!(never.is_err(), "the system clock's moves are not announced");
        let system = Clock::system();
        let before = system.now_ms();
        system.advance(Duration::from_secs(3600));
        assert!(system.now_ms() - before < 3_600_000, "the system clock is not moved by hand");
    }
}
