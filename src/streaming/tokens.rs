//! Single-use, expiring tokens naming a pending streaming request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Pending requests kept at once; more are refused rather than let a client
/// that never connects grow the daemon.
pub const MAX_PENDING: usize = 4096;

pub struct Tokens<T> {
    ttl: Duration,
    pending: Mutex<HashMap<String, (Instant, T)>>,
}

impl<T> Tokens<T> {
    pub fn new(ttl: Duration) -> Self {
        Tokens {
            ttl,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Stores `value` under a new random token; `None` when too many are
    /// pending.
    pub fn insert(&self, value: T) -> Option<String> {
        let token = hex::encode(rand::random::<[u8; 24]>());
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, (expires, _)| *expires > now);
        if pending.len() >= MAX_PENDING {
            return None;
        }
        pending.insert(token.clone(), (now + self.ttl, value));
        Some(token)
    }

    /// Takes the value of `token` if it exists and has not expired: each
    /// token works once.
    pub fn take(&self, token: &str) -> Option<T> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (expires, value) = pending.remove(token)?;
        (expires > Instant::now()).then_some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use() {
        let t = Tokens::new(Duration::from_secs(60));
        let a = t.insert(1).unwrap();
        let b = t.insert(2).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 48);
        assert_eq!(t.take(&a), Some(1));
        assert_eq!(t.take(&a), None);
        assert_eq!(t.take("nope"), None);
        assert_eq!(t.take(&b), Some(2));
    }

    #[test]
    fn expired_tokens_are_gone() {
        let t = Tokens::new(Duration::ZERO);
        let a = t.insert(1).unwrap();
        assert_eq!(t.take(&a), None);
    }

    #[test]
    fn bounded() {
        let t = Tokens::new(Duration::from_secs(60));
        for i in 0..MAX_PENDING {
            assert!(t.insert(i).is_some());
        }
        assert!(t.insert(0).is_none());
    }
}
