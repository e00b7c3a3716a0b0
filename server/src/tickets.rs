//! Tickets: the grant that lets a request reach an image, and their life.
//! The ticket id is the `{ticket}` path segment and the only credential on
//! the data API. `--image` tickets live as long as the server; tickets of
//! the control API (or `--ticket FILE`) expire `timeout` seconds after
//! their last operation, or after `inactivity_timeout` unused, and can be
//! deleted, which cancels what runs on them. Every data request is an
//! [`Operation`]: it holds a reader or writer slot (`max_readers` and
//! `max_writers` are enforced: 503 past them), keeps the ticket active,
//! records the ranges it completed, and renews the expiry when it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

// parking_lot's locks are not poisoned: a panic in one request must not
// make every later request (and the reaper) panic on the same lock.
use parking_lot::{Mutex, MutexGuard, RwLock};

use blockgate_protocol::ticket::{MAX_TIMEOUT, TicketSpec, TicketStatus};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::metrics::metrics;
use crate::ranges::RangeSet;
use crate::sources::backend::Backend;

/// Per-ticket connection limits, advertised in OPTIONS and enforced.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests that may read at once.
    pub max_readers: u32,
    /// Requests that may write at once.
    pub max_writers: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_readers: 8, max_writers: 8 }
    }
}

/// What a request does to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads (GET, extents, checksum).
    Read,
    /// Writes (PUT, PATCH).
    Write,
    /// Makes or deletes a checkpoint (a reader slot; needs `write` or the
    /// `checkpoint` op).
    Checkpoint,
}

/// What a ticket lets its holder do.
#[derive(Debug, Clone, Copy)]
struct Rights {
    writable: bool,
    sparse: bool,
    may_checkpoint: bool,
}

/// Expiry rules of a control ticket.
#[derive(Debug, Clone, Copy)]
struct Lifetime {
    timeout: Duration,
    inactivity: Duration,
}

struct State {
    expires: Instant,
    last_active: Instant,
    transferred: RangeSet,
    canceled: bool,
}

/// What logs and messages call a ticket: the first 8 hex digits of a
/// BLAKE2s-256 hash of its id, the same in every line, so that an operator
/// can follow a ticket through the log without the log holding the
/// credential (`python3 -c 'import hashlib; print(hashlib.blake2s(b"ID").hexdigest()[:8])'`).
pub fn fingerprint(id: &str) -> String {
    use blake2::Digest;
    hex::encode(&blake2::Blake2s256::digest(id.as_bytes())[..4])
}

/// Access to one image.
pub struct Ticket {
    /// The id in URLs: a credential, never logged.
    pub id: String,
    /// What logs and messages call it ([`fingerprint`]).
    pub fingerprint: String,
    /// Where the image lives.
    pub backend: Arc<Backend>,
    /// PUT and PATCH allowed.
    pub writable: bool,
    /// Zeroing may deallocate.
    pub sparse: bool,
    /// Checkpoints may be made and deleted.
    pub may_checkpoint: bool,
    /// Connection limits.
    pub limits: Limits,
    spec: Option<TicketSpec>,
    lifetime: Option<Lifetime>,
    state: Mutex<State>,
    active: AtomicU64,
    idle: Notify,
    readers: Arc<Semaphore>,
    writers: Arc<Semaphore>,
    cancel: CancellationToken,
}

impl Ticket {
    fn new(
        id: String,
        backend: Arc<Backend>,
        rights: Rights,
        limits: Limits,
        spec: Option<TicketSpec>,
        lifetime: Option<Lifetime>,
    ) -> Ticket {
        let Rights { writable, sparse, may_checkpoint } = rights;
        let now = Instant::now();
        let expires = now + lifetime.map_or(Duration::ZERO, |lifetime| lifetime.timeout);
        Ticket {
            fingerprint: fingerprint(&id),
            id,
            backend,
            writable,
            sparse,
            may_checkpoint,
            limits,
            spec,
            lifetime,
            state: Mutex::new(State { expires, last_active: now, transferred: RangeSet::default(), canceled: false }),
            active: AtomicU64::new(0),
            idle: Notify::new(),
            readers: Arc::new(Semaphore::new(limits.max_readers as usize)),
            writers: Arc::new(Semaphore::new(limits.max_writers as usize)),
            cancel: CancellationToken::new(),
        }
    }

    /// A ticket that never expires (`--image`); it may always make and
    /// delete checkpoints.
    pub fn permanent(id: String, backend: Arc<Backend>, writable: bool, sparse: bool, limits: Limits) -> Ticket {
        Ticket::new(id, backend, Rights { writable, sparse, may_checkpoint: true }, limits, None, None)
    }

    /// A ticket of the control API.
    pub fn from_spec(spec: TicketSpec, backend: Arc<Backend>, limits: Limits) -> Ticket {
        let lifetime = Lifetime { timeout: Duration::from_secs(spec.timeout), inactivity: Duration::from_secs(spec.inactivity_timeout) };
        let rights = Rights { writable: spec.writable(), sparse: spec.sparse, may_checkpoint: spec.may_checkpoint() };
        Ticket::new(spec.uuid.clone(), backend, rights, limits, Some(spec), Some(lifetime))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Why the ticket can no longer be used, if it cannot.
    fn unusable(&self, now: Instant) -> Option<&'static str> {
        let state = self.state();
        if state.canceled {
            return Some("was canceled");
        }
        let lifetime = self.lifetime?;
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if now > state.expires {
            return Some("expired");
        }
        (now.duration_since(state.last_active) > lifetime.inactivity).then_some("expired (inactive)")
    }

    /// Starts an operation: refuses a forbidden one (403) or one past the
    /// ticket's limit (503).
    pub fn begin(self: &Arc<Self>, access: Access) -> Result<Operation, ApiError> {
        if let Some(why) = self.unusable(Instant::now()) {
            return Err(ApiError::Forbidden(format!("ticket {} {why}", self.fingerprint)));
        }
        let (slots, limit, what) = match access {
            Access::Read => (&self.readers, self.limits.max_readers, "readers"),
            Access::Checkpoint if !self.may_checkpoint => {
                return Err(ApiError::Forbidden(format!(
                    "ticket {} may not change checkpoints: that needs the \"write\" or \"checkpoint\" op",
                    self.fingerprint
                )));
            }
            Access::Checkpoint => (&self.readers, self.limits.max_readers, "readers"),
            Access::Write if !self.writable => {
                return Err(ApiError::Forbidden(format!("ticket {} is read-only: writing needs the \"write\" op", self.fingerprint)));
            }
            Access::Write => (&self.writers, self.limits.max_writers, "writers"),
        };
        let permit = slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::Unavailable(format!("ticket {} already has {limit} {what} (max_{what}); retry when one finishes", self.fingerprint))
        })?;
        self.active.fetch_add(1, Ordering::SeqCst);
        metrics().transfers.inc();
        Ok(Operation { ticket: self.clone(), _permit: permit })
    }

    /// Refuses a request on a ticket that is no longer usable (for routes
    /// that take no slot, such as OPTIONS).
    pub fn check(&self) -> Result<(), ApiError> {
        match self.unusable(Instant::now()) {
            Some(why) => Err(ApiError::Forbidden(format!("ticket {} {why}", self.fingerprint))),
            None => Ok(()),
        }
    }

    /// Completes when the ticket is canceled.
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Sets the expiry to `timeout` seconds from now.
    pub fn extend(&self, timeout: u64) {
        self.state().expires = later(Instant::now(), Duration::from_secs(timeout));
    }

    /// When the ticket expires, on the wall clock, if nothing uses it
    /// before then (each request pushes it back).
    pub fn expires_at(&self) -> std::time::SystemTime {
        let left = self.state().expires.saturating_duration_since(Instant::now());
        std::time::SystemTime::now() + left
    }

    /// The status of a control ticket.
    pub fn status(&self) -> Option<TicketStatus> {
        let spec = self.spec.clone()?;
        let now = Instant::now();
        let state = self.state();
        let active = self.active.load(Ordering::SeqCst);
        Some(TicketStatus {
            spec,
            active: active > 0,
            canceled: state.canceled,
            connections: active,
            expires: monotonic_seconds_at(state.expires, now),
            idle_time: if active > 0 { 0 } else { now.duration_since(state.last_active).as_secs() },
            transferred: state.transferred.total(),
        })
    }

    /// Cancels the ticket and waits up to `wait` for its operations to end;
    /// true if none runs any more.
    async fn cancel(&self, wait: Duration) -> bool {
        self.state().canceled = true;
        self.cancel.cancel();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let idle = self.idle.notified();
            if self.active.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.active.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

/// `now + wait`, checked: the ticket parser caps timeouts at ten years,
/// and a longer wait from anywhere else is cut to that rather than panic.
fn later(now: Instant, wait: Duration) -> Instant {
    let wait = wait.min(Duration::from_secs(MAX_TIMEOUT));
    now.checked_add(wait).unwrap_or(now)
}

/// Seconds on the monotonic clock (as imageio reports `expires`) of an
/// instant.
fn monotonic_seconds_at(at: Instant, now: Instant) -> u64 {
    let clock = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |now| now.tv_sec() as u64);
    if at >= now { clock.saturating_add(at.duration_since(now).as_secs()) } else { clock.saturating_sub(now.duration_since(at).as_secs()) }
}

/// A request running on a ticket.
pub struct Operation {
    ticket: Arc<Ticket>,
    _permit: OwnedSemaphorePermit,
}

impl Operation {
    /// The ticket.
    pub fn ticket(&self) -> &Arc<Ticket> {
        &self.ticket
    }

    /// Records `[start, end)` as transferred.
    pub fn record(&self, start: u64, end: u64) {
        self.ticket.state().transferred.insert(start, end);
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        let now = Instant::now();
        {
            let mut state = self.ticket.state();
            state.last_active = now;
            if let Some(lifetime) = self.ticket.lifetime {
                state.expires = later(now, lifetime.timeout);
            }
        }
        self.ticket.active.fetch_sub(1, Ordering::SeqCst);
        metrics().transfers.dec();
        self.ticket.idle.notify_waiters();
    }
}

/// All tickets of a server.
pub struct Tickets {
    tickets: RwLock<HashMap<String, Arc<Ticket>>>,
    /// How long a DELETE waits for running operations.
    cancel_wait: Duration,
}

impl Tickets {
    /// An empty registry.
    pub fn new(cancel_wait: Duration) -> Tickets {
        Tickets { tickets: RwLock::new(HashMap::new()), cancel_wait }
    }

    /// Adds a ticket; a ticket it replaces is returned to be retired.
    pub fn insert(&self, ticket: Ticket) -> Option<Arc<Ticket>> {
        self.tickets.write().insert(ticket.id.clone(), Arc::new(ticket))
    }

    /// The ticket with this id, or 403.
    pub fn get(&self, id: &str) -> Result<Arc<Ticket>, ApiError> {
        self.tickets.read().get(id).cloned().ok_or_else(|| ApiError::Forbidden(format!("no such ticket {id:?}")))
    }

    /// Starts an operation on the ticket `id`.
    pub fn begin(&self, id: &str, access: Access) -> Result<Operation, ApiError> {
        self.get(id)?.begin(access)
    }

    /// The ticket for the control API (404 when unknown).
    pub fn find(&self, id: &str) -> Option<Arc<Ticket>> {
        self.tickets.read().get(id).cloned()
    }

    /// Cancels and removes a ticket, then releases its backend. 409 if its
    /// operations do not end in time (it stays canceled).
    pub async fn remove(&self, id: &str) -> Result<(), ApiError> {
        let Some(ticket) = self.find(id) else { return Ok(()) };
        if !ticket.cancel(self.cancel_wait).await {
            return Err(ApiError::Conflict(format!(
                "ticket {id:?} is canceled but operations still run after {:?}; try again",
                self.cancel_wait
            )));
        }
        self.retire(id, &ticket).await;
        Ok(())
    }

    /// Removes every ticket; the first ticket still busy is a 409.
    pub async fn remove_all(&self) -> Result<(), ApiError> {
        let ids: Vec<String> = self.tickets.read().keys().cloned().collect();
        for id in ids {
            self.remove(&id).await?;
        }
        Ok(())
    }

    /// Removes expired tickets and releases their backends.
    pub async fn reap_expired(&self) {
        let now = Instant::now();
        let expired: Vec<(String, Arc<Ticket>)> = self
            .tickets
            .read()
            .iter()
            .filter(|(_, ticket)| ticket.lifetime.is_some() && ticket.unusable(now).is_some() && ticket.active.load(Ordering::SeqCst) == 0)
            .map(|(id, ticket)| (id.clone(), ticket.clone()))
            .collect();
        for (id, ticket) in expired {
            tracing::info!(ticket = %ticket.fingerprint, "ticket expired");
            ticket.cancel.cancel();
            self.retire(&id, &ticket).await;
        }
    }

    /// Takes a ticket out of the registry (if it is still this one) and
    /// stops its backend.
    async fn retire(&self, id: &str, ticket: &Arc<Ticket>) {
        {
            let mut tickets = self.tickets.write();
            if tickets.get(id).is_some_and(|current| Arc::ptr_eq(current, ticket)) {
                tickets.remove(id);
            }
        }
        ticket.backend.stop().await;
    }

    /// How many tickets have a request running, and how many have none.
    pub fn state_counts(&self) -> (i64, i64) {
        let tickets = self.tickets.read();
        let active = tickets.values().filter(|ticket| ticket.active.load(Ordering::SeqCst) > 0).count() as i64;
        (active, tickets.len() as i64 - active)
    }

    /// Removes every ticket, returning them (for shutdown).
    pub fn drain(&self) -> Vec<Arc<Ticket>> {
        self.tickets.write().drain().map(|(_, ticket)| ticket).collect()
    }
}
