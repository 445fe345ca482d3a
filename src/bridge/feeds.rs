//! [`FeedSlots`]: how many live feeds (`GET /bmw/events/stream`) the bridge
//! holds open. A feed outlives its request (the request limits let it go
//! once its headers are sent) and holds an ordered consumer and three KV
//! watches on NATS, so feeds are counted on their own: at most
//! [`MAX_FEEDS`] in all and [`MAX_FEEDS_PER_CALLER`] per caller (per bearer
//! token; every caller without one counts as one), each slot held until the
//! feed ends. One more is answered 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::envelope::ApiError;

/// Live feeds open at once, all callers together.
pub const MAX_FEEDS: usize = 64;
/// Live feeds open at once for one token (or for all callers without one).
pub const MAX_FEEDS_PER_CALLER: usize = 8;

/// The open feeds: in all, and by caller (a digest of its `Authorization`
/// header, so no secret is kept).
#[derive(Debug, Default)]
pub struct FeedSlots {
    open: Mutex<(usize, HashMap<[u8; 32], usize>)>,
}

/// One open feed's slot, given back when dropped (with the feed's body).
#[derive(Debug)]
pub(crate) struct FeedSlot {
    slots: Arc<FeedSlots>,
    caller: [u8; 32],
}

impl FeedSlots {
    /// A slot for the caller of `headers`, or the 429 that refuses it.
    pub(crate) fn take(self: &Arc<Self>, headers: &HeaderMap) -> Result<FeedSlot, ApiError> {
        let presented = headers
            .get(AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let caller: [u8; 32] = Sha256::digest(presented).into();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_caller) = &mut *open;
        let mine = by_caller.entry(caller).or_insert(0);
        let refused = if *total >= MAX_FEEDS {
            Some(format!("{MAX_FEEDS} live feeds are open on this bridge"))
        } else if *mine >= MAX_FEEDS_PER_CALLER {
            Some(format!(
                "{MAX_FEEDS_PER_CALLER} live feeds are open for this caller (its token)"
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            if *mine == 0 {
                by_caller.remove(&caller);
            }
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many live feeds: {why}; close one (a console tab) or try again later"),
            ));
        }
        *mine += 1;
        *total += 1;
        Ok(FeedSlot {
            slots: self.clone(),
            caller,
        })
    }

    /// Feeds open now.
    pub fn open(&self) -> usize {
        self.open.lock().map(|o| o.0).unwrap_or(0)
    }
}

impl Drop for FeedSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_caller) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = by_caller.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_caller.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        headers
    }

    #[test]
    fn feeds_are_limited_per_caller_and_in_all_and_given_back() {
        let slots = Arc::new(FeedSlots::default());
        let a: Vec<_> = (0..MAX_FEEDS_PER_CALLER)
            .map(|_| slots.take(&caller("a")).unwrap())
            .collect();
        assert!(slots.take(&caller("a")).is_err(), "one more for a");
        let b = slots.take(&caller("b")).expect("another caller still may");
        drop(a);
        assert_eq!(slots.open(), 1);
        let mut many = vec![b];
        for n in 0..MAX_FEEDS - 1 {
            many.push(slots.take(&caller(&format!("c{n}"))).unwrap());
        }
        assert!(
            slots.take(&HeaderMap::new()).is_err(),
            "the total is reached"
        );
        many.clear();
        assert_eq!(slots.open(), 0);
        assert!(
            slots.open.lock().unwrap().1.is_empty(),
            "no caller left behind"
        );
    }
}
