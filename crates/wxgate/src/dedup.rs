//! The in-memory half of de-duplication: which pushes are being answered right now and
//! which were answered recently, with their replies.
//!
//! WeChat delivers a push again when it has no answer within 5 s, up to three deliveries.
//! A retry that arrives while the first delivery is still being handled waits for it and
//! gets the same reply; one that arrives after it gets the cached reply at once. Entries
//! are kept for a window (default 10 min, far beyond WeChat's ~15 s of retries) and their
//! number is capped; the store remains the authority beyond both.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

const SHARDS: usize = 16;

/// How a push was answered, shared with its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The plain reply XML, `None` for `success`.
    pub reply: Option<Arc<str>>,
}

/// What [`Dedup::claim`] found.
pub enum Claim {
    /// Nobody handles this push: the caller must, then call [`Guard::finish`].
    New(Guard),
    /// Another delivery is handling it; wait on the receiver. It turns `Some` when
    /// answered and is closed if that delivery failed (then claim again). The number
    /// counts the deliveries that joined, this one included (1 for the first retry).
    InFlight(watch::Receiver<Option<Answer>>, u32),
    /// Answered recently.
    Done(Answer),
}

enum Entry {
    InFlight(watch::Receiver<Option<Answer>>, Arc<AtomicU32>),
    Done(Answer, Instant),
}

#[derive(Default)]
struct Shard {
    map: HashMap<Arc<str>, Entry>,
    /// Answered keys in the order they were answered, for expiry and the cap.
    order: VecDeque<(Instant, Arc<str>)>,
}

/// The shared in-memory table.
pub struct Dedup {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    window: Duration,
    cap_per_shard: usize,
}

/// The right and duty to answer one push.
pub struct Guard {
    dedup: Arc<Dedup>,
    key: Arc<str>,
    tx: Option<watch::Sender<Option<Answer>>>,
}

impl Dedup {
    pub fn new(window: Duration, capacity: usize) -> Arc<Dedup> {
        Arc::new(Dedup {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            window,
            cap_per_shard: capacity.div_ceil(SHARDS).max(1),
        })
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// Looks the key up and, when nobody has it, claims it for the caller.
    pub fn claim(self: &Arc<Self>, key: &str) -> Claim {
        let now = Instant::now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        match shard.map.get(key) {
            Some(Entry::InFlight(rx, joins)) => {
                return Claim::InFlight(rx.clone(), joins.fetch_add(1, Ordering::Relaxed) + 1);
            }
            Some(Entry::Done(answer, at)) if now.duration_since(*at) < self.window => {
                return Claim::Done(answer.clone());
            }
            _ => {}
        }
        let key: Arc<str> = Arc::from(key);
        let (tx, rx) = watch::channel(None);
        shard.map.insert(key.clone(), Entry::InFlight(rx, Arc::default()));
        Claim::New(Guard { dedup: self.clone(), key, tx: Some(tx) })
    }

    /// Remembers an answer given before (at start-up, from the store).
    pub fn remember(&self, key: &str, answer: Answer) {
        let now = Instant::now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let key: Arc<str> = Arc::from(key);
        if !shard.map.contains_key(&key) {
            self.done(&mut shard, key, answer, now);
        }
    }

    fn done(&self, shard: &mut Shard, key: Arc<str>, answer: Answer, now: Instant) {
        shard.map.insert(key.clone(), Entry::Done(answer, now));
        shard.order.push_back((now, key));
        // Expire from the front: old entries, then the oldest beyond the cap.
        while let Some((at, front)) = shard.order.front() {
            let expired =
                now.duration_since(*at) >= self.window || shard.order.len() > self.cap_per_shard;
            if !expired {
                break;
            }
            if matches!(shard.map.get(front), Some(Entry::Done(_, t)) if t == at) {
                shard.map.remove(front);
            }
            shard.order.pop_front();
        }
    }

    /// Keys held in memory (answered and in flight).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Guard {
    /// A receiver that turns `Some` when this guard is finished.
    pub fn subscribe(&self) -> watch::Receiver<Option<Answer>> {
        self.tx.as_ref().map_or_else(|| watch::channel(None).1, |tx| tx.subscribe())
    }

    /// Publishes the answer to waiting retries and remembers it.
    pub fn finish(mut self, answer: Answer) {
        let now = Instant::now();
        let mut shard = self.dedup.shard(&self.key).lock().unwrap_or_else(|p| p.into_inner());
        self.dedup.done(&mut shard, self.key.clone(), answer.clone(), now);
        drop(shard);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(answer));
        }
    }
}

impl Drop for Guard {
    /// Not finished: the delivery failed. Release the key so that a retry may try again;
    /// dropping the sender wakes the waiters, who then claim it anew.
    fn drop(&mut self) {
        if self.tx.is_some() {
            let mut shard = self.dedup.shard(&self.key).lock().unwrap_or_else(|p| p.into_inner());
            if matches!(shard.map.get(&self.key), Some(Entry::InFlight(..))) {
                shard.map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(s: &str) -> Answer {
        Answer { reply: Some(Arc::from(s)) }
    }

    #[tokio::test]
    async fn retry_during_flight_waits_then_later_ones_hit_the_cache() {
        let d = Dedup::new(Duration::from_secs(60), 100);
        let Claim::New(guard) = d.claim("k") else { panic!("first claim must be new") };
        let Claim::InFlight(mut rx, 1) = d.claim("k") else { panic!("second claim must wait") };
        assert!(matches!(d.claim("k"), Claim::InFlight(_, 2)), "joins are counted");
        guard.finish(answer("r"));
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), Some(answer("r")));
        assert!(matches!(d.claim("k"), Claim::Done(a) if a == answer("r")));
    }

    #[tokio::test]
    async fn a_failed_delivery_releases_the_key() {
        let d = Dedup::new(Duration::from_secs(60), 100);
        let Claim::New(guard) = d.claim("k") else { panic!() };
        let Claim::InFlight(mut rx, _) = d.claim("k") else { panic!() };
        drop(guard);
        assert!(rx.changed().await.is_err());
        assert!(matches!(d.claim("k"), Claim::New(_)));
    }

    #[test]
    fn memory_is_capped_and_expires() {
        let d = Dedup::new(Duration::from_secs(60), 16 * 4);
        for i in 0..10_000 {
            d.remember(&format!("k{i}"), answer("r"));
        }
        assert!(d.len() <= 16 * 4, "{} entries kept", d.len());

        let d = Dedup::new(Duration::ZERO, 100);
        d.remember("k", answer("r"));
        assert!(matches!(d.claim("k"), Claim::New(_)));
    }
}
