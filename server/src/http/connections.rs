//! The open connections of a listener (or of the listeners that share one
//! budget), and how long each may stay. A connection counts against its
//! budget's cap and, when it has a client address, against that address's
//! cap. It is idle while no request runs on it: from its accept (TLS
//! handshake included) until its first request head is complete, between
//! keep-alive requests, and an HTTP/2 connection with no open stream
//! (PINGs do not count). An idle connection is closed once it has been
//! idle for the idle timeout. When a cap is reached, a new connection
//! takes the place of the least recently active idle one (of its address,
//! for the address's cap); only when every one of them has a request
//! running is the new one refused. So idle clients, however many, never
//! keep a working client out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The connections a set of listeners may hold open.
pub struct Budget {
    max: usize,
    per_address: Option<usize>,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    connections: HashMap<u64, (Option<IpAddr>, Arc<Activity>)>,
    per_address: HashMap<IpAddr, usize>,
}

impl Open {
    /// Closes the least recently active idle connection that `candidate`
    /// accepts by its address; false if none is idle.
    fn evict_idlest(&mut self, candidate: impl Fn(Option<IpAddr>) -> bool) -> bool {
        let idlest = self
            .connections
            .iter()
            .filter(|(_, (address, activity))| candidate(*address) && activity.is_idle())
            .min_by_key(|(_, (_, activity))| *activity.last_active.lock())
            .map(|(&id, _)| id);
        match idlest.and_then(|id| self.remove(id)) {
            Some(evicted) => {
                evicted.evicted.cancel();
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, id: u64) -> Option<Arc<Activity>> {
        let (address, activity) = self.connections.remove(&id)?;
        if let Some(address) = address {
            if let Some(count) = self.per_address.get_mut(&address) {
                *count -= 1;
                if *count == 0 {
                    self.per_address.remove(&address);
                }
            }
        }
        Some(activity)
    }
}

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its client address holds as many connections as it may, and every
    /// one has a request running.
    #[error("every connection of the client address has a request running")]
    AddressFull,
    /// The budget is full and every connection has a request running.
    #[error("every connection has a request running")]
    AllBusy,
}

impl Budget {
    /// At most `max` connections, and `per_address` from one client
    /// address (connections without an address, on unix sockets, have only
    /// the first cap).
    pub fn new(max: usize, per_address: Option<usize>) -> Arc<Budget> {
        Arc::new(Budget { max, per_address, open: Mutex::new(Open::default()) })
    }

    /// Counts a new connection in, making room by closing the least
    /// recently active idle connection when a cap is reached.
    pub fn admit(self: &Arc<Self>, address: Option<IpAddr>) -> Result<Slot, Refusal> {
        let mut open = self.open.lock();
        if let (Some(address), Some(cap)) = (address, self.per_address) {
            let full = open.per_address.get(&address).is_some_and(|&count| count >= cap);
            if full && !open.evict_idlest(|other| other == Some(address)) {
                return Err(Refusal::AddressFull);
            }
        }
        if open.connections.len() >= self.max && !open.evict_idlest(|_| true) {
            return Err(Refusal::AllBusy);
        }
        let id = open.next_id;
        open.next_id += 1;
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            evicted: CancellationToken::new(),
        });
        open.connections.insert(id, (address, activity.clone()));
        if let Some(address) = address {
            *open.per_address.entry(address).or_default() += 1;
        }
        Ok(Slot { budget: self.clone(), id, activity })
    }
}

/// A connection's place in its budget, given back when dropped.
pub struct Slot {
    budget: Arc<Budget>,
    id: u64,
    /// What runs on the connection.
    pub activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.open.lock().remove(self.id);
    }
}

/// Requests running on a connection, and when it was last active.
pub struct Activity {
    in_flight: AtomicUsize,
    last_active: Mutex<Instant>,
    evicted: CancellationToken,
}

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// No request ran on it for the idle timeout.
    Idle,
    /// A new connection took its place.
    Evicted,
}

impl Activity {
    /// A request starts; it runs until the [`Busy`] is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        *self.last_active.lock() = Instant::now();
        Busy(self.clone())
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Completes when the connection is to be closed: idle for `timeout`,
    /// or evicted.
    pub async fn closing(&self, timeout: Duration) -> Closing {
        let mut deadline = *self.last_active.lock() + timeout;
        loop {
            tokio::select! {
                () = self.evicted.cancelled() => return Closing::Evicted,
                () = tokio::time::sleep_until(deadline) => {}
            }
            let idle_until = *self.last_active.lock() + timeout;
            deadline = match self.is_idle() {
                true if idle_until <= Instant::now() => return Closing::Idle,
                true => idle_until,
                // Busy: look again a whole timeout after now.
                false => Instant::now() + timeout,
            };
        }
    }
}

/// A request running on a connection.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last_active.lock() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_closes_its_least_recently_active_idle_connection() {
        let budget = Budget::new(3, Some(2));
        let oldest = budget.admit(address(1)).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let busy = budget.admit(address(2)).unwrap();
        let _request = busy.activity.begin();
        let newer = budget.admit(address(3)).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let fourth = budget.admit(address(4)).unwrap();
        assert!(oldest.activity.evicted.is_cancelled(), "the idle connection that was active longest ago goes");
        assert!(!newer.activity.evicted.is_cancelled() && !busy.activity.evicted.is_cancelled());
        let fifth = budget.admit(address(5)).unwrap();
        assert!(newer.activity.evicted.is_cancelled());
        let _requests = (fourth.activity.begin(), fifth.activity.begin());
        assert_eq!(budget.admit(address(6)).err(), Some(Refusal::AllBusy), "busy connections are never closed");
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_gets_its_cap_and_no_more() {
        let budget = Budget::new(10, Some(2));
        let other = budget.admit(address(2)).unwrap();
        let first = budget.admit(address(1)).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = budget.admit(address(1)).unwrap();
        let third = budget.admit(address(1)).unwrap();
        assert!(first.activity.evicted.is_cancelled(), "the address's idlest connection makes room");
        assert!(!other.activity.evicted.is_cancelled(), "never another address's");
        let requests = (second.activity.begin(), third.activity.begin());
        assert_eq!(budget.admit(address(1)).err(), Some(Refusal::AddressFull), "busy connections are never closed");
        assert!(budget.admit(address(3)).is_ok(), "other addresses still get in");
        drop(requests);
        drop(second);
        assert!(budget.admit(address(1)).is_ok(), "a closed connection frees its address's place");
        let unix = Budget::new(3, Some(1));
        let _held: Vec<Slot> = (0..3).map(|_| unix.admit(None).unwrap()).collect();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_after_the_idle_timeout_but_never_while_busy() {
        let budget = Budget::new(1, None);
        let slot = budget.admit(None).unwrap();
        let request = slot.activity.begin();
        let started = Instant::now();
        tokio::select! {
            _ = slot.activity.closing(Duration::from_secs(2)) => panic!("closed while a request runs"),
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        drop(request);
        assert_eq!(slot.activity.closing(Duration::from_secs(2)).await, Closing::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(12), "idle for the timeout after the request ended");
    }
}
