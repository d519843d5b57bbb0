//! The token registry: which tokens are live, for whom, over what, until when; and, for a
//! while after they die, why they died (so a late redeem gets [`Error::Revoked`],
//! [`Error::Invalidated`] or [`Error::Expired`] rather than "unknown").
//!
//! A token lives until the first of: its hard expiry, `inactivity TTL` without a successful
//! redeem, revocation, or a write overlapping its source range (seen by the
//! [`TrackedDisk`]). Live tokens count against a per-principal limit and a global one, which
//! bound the registry's memory; remembered deaths are bounded too ([`MAX_TOMBSTONES`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::acl::PrincipalId;
use crate::body::{Audience, TokenId};
use crate::error::{Error, Result};
use crate::tracked::{LiveState, TrackedDisk};

/// Most dead tokens whose cause of death is remembered.
pub const MAX_TOMBSTONES: usize = 65_536;

/// Why a token died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    Revoked,
    Invalidated,
    Expired,
}

impl Death {
    fn error(self, id: TokenId) -> Error {
        match self {
            Death::Revoked => Error::Revoked(id),
            Death::Invalidated => Error::Invalidated(id),
            Death::Expired => Error::Expired(id),
        }
    }
}

/// One live token.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) minter: PrincipalId,
    pub(crate) audience: Audience,
    pub(crate) source: Arc<TrackedDisk>,
    pub(crate) offset: u64,
    pub(crate) length: u64,
    pub(crate) last_used_ms: u64,
    pub(crate) ttl_ms: u64,
    pub(crate) expires_ms: u64,
    pub(crate) state: Arc<LiveState>,
}

impl Entry {
    fn expired(&self, now: u64) -> bool {
        now >= self.expires_ms || now >= self.last_used_ms.saturating_add(self.ttl_ms)
    }
}

#[derive(Debug, Default)]
struct Inner {
    live: HashMap<TokenId, Entry>,
    per_principal: HashMap<PrincipalId, usize>,
    tombs: HashMap<TokenId, Death>,
    tomb_order: VecDeque<TokenId>,
}

impl Inner {
    /// Moves a live token to the tombstones.
    fn bury(&mut self, id: TokenId, death: Death) {
        let Some(e) = self.live.remove(&id) else {
            return;
        };
        e.source.forget(&id);
        if let Some(n) = self.per_principal.get_mut(&e.minter) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_principal.remove(&e.minter);
            }
        }
        if self.tombs.insert(id, death).is_none() {
            self.tomb_order.push_back(id);
        }
        while self.tomb_order.len() > MAX_TOMBSTONES {
            if let Some(old) = self.tomb_order.pop_front() {
                self.tombs.remove(&old);
            }
        }
    }

    /// Buries every expired or invalidated token.
    fn purge(&mut self, now: u64) {
        let dead: Vec<(TokenId, Death)> = self
            .live
            .iter()
            .filter_map(|(id, e)| {
                if e.state.is_invalidated() {
                    Some((*id, Death::Invalidated))
                } else if e.expired(now) {
                    Some((*id, Death::Expired))
                } else {
                    None
                }
            })
            .collect();
        for (id, d) in dead {
            self.bury(id, d);
        }
    }
}

/// The registry of one provider.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

impl Registry {
    /// Registers a new live token after purging the dead; refuses it if its minter already
    /// holds `per_principal` live tokens or the provider `total`.
    pub(crate) fn insert(
        &self,
        id: TokenId,
        entry: Entry,
        now: u64,
        per_principal: usize,
        total: usize,
    ) -> Result<()> {
        let mut g = self.inner.lock();
        if g.live.contains_key(&id) {
            return Ok(());
        }
        if let Some(d) = g.tombs.get(&id) {
            return Err(d.error(id));
        }
        g.purge(now);
        let held = g.per_principal.get(&entry.minter).copied().unwrap_or(0);
        if held >= per_principal || g.live.len() >= total {
            return Err(Error::TooManyTokens {
                principal: entry.minter,
                limit: if held >= per_principal {
                    per_principal
                } else {
                    total
                },
            });
        }
        entry
            .source
            .watch(id, entry.offset, entry.length, entry.state.clone());
        *g.per_principal.entry(entry.minter).or_insert(0) += 1;
        g.live.insert(id, entry);
        Ok(())
    }

    /// The live entry of `id`, or why there is none. A token found dead here is buried.
    pub(crate) fn check(&self, id: TokenId, now: u64) -> Result<Entry> {
        let mut g = self.inner.lock();
        let Some(e) = g.live.get(&id) else {
            return Err(g
                .tombs
                .get(&id)
                .map_or(Error::UnknownToken(id), |d| d.error(id)));
        };
        let death = if e.state.is_invalidated() {
            Some(Death::Invalidated)
        } else if e.expired(now) {
            Some(Death::Expired)
        } else {
            None
        };
        if let Some(d) = death {
            g.bury(id, d);
            return Err(d.error(id));
        }
        Ok(e.clone())
    }

    /// Records a successful redeem (restarts the inactivity clock).
    pub(crate) fn touch(&self, id: TokenId, now: u64) {
        if let Some(e) = self.inner.lock().live.get_mut(&id) {
            e.last_used_ms = e.last_used_ms.max(now);
        }
    }

    /// Buries `id` as invalidated (a redeem saw the flag after reading).
    pub(crate) fn invalidated(&self, id: TokenId) {
        self.inner.lock().bury(id, Death::Invalidated);
    }

    /// Revokes one token; returns whether it was live. A token a write already invalidated
    /// stays remembered as invalidated (it died first).
    pub(crate) fn revoke(&self, id: TokenId) -> bool {
        let mut g = self.inner.lock();
        let Some(e) = g.live.get(&id) else {
            return false;
        };
        if e.state.is_invalidated() {
            g.bury(id, Death::Invalidated);
            return false;
        }
        g.bury(id, Death::Revoked);
        true
    }

    /// Revokes every live token matching `pred`; returns how many.
    pub(crate) fn revoke_where(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        let mut g = self.inner.lock();
        let ids: Vec<(TokenId, bool)> = g
            .live
            .iter()
            .filter(|(_, e)| pred(e))
            .map(|(id, e)| (*id, e.state.is_invalidated()))
            .collect();
        let mut n = 0;
        for (id, invalidated) in ids {
            if invalidated {
                g.bury(id, Death::Invalidated);
            } else {
                g.bury(id, Death::Revoked);
                n += 1;
            }
        }
        n
    }

    /// Buries the dead; returns how many tokens stay live.
    pub(crate) fn purge(&self, now: u64) -> usize {
        let mut g = self.inner.lock();
        g.purge(now);
        g.live.len()
    }

    /// Live tokens minted by `who` (after burying the dead).
    pub(crate) fn live_of(&self, who: &PrincipalId, now: u64) -> usize {
        let mut g = self.inner.lock();
        g.purge(now);
        g.per_principal.get(who).copied().unwrap_or(0)
    }

    /// Live tokens over `disk`.
    pub(crate) fn live_on(&self, disk: &Uuid) -> usize {
        self.inner
            .lock()
            .live
            .values()
            .filter(|e| e.source.id() == *disk)
            .count()
    }
}
