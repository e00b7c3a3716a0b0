//! Response bodies of one HTTP/2 connection take turns, oldest first, as
//! nginx sends static files: a response's data goes out before the data of
//! responses asked for after it, instead of hyper's frame-by-frame round
//! robin over every stream with data. A body holds the turn from its first
//! data to its end; the next one in line starts while the last chunks of
//! the previous one are still in hyper's send buffer, so at most that much
//! is interleaved.
//!
//! Why: QEMU's curl block driver (`json:{"file.driver":"https",...}`, QEMU
//! 10.0) handles one finished transfer per socket event or timer. libcurl
//! multiplexes its 2.25 MiB range reads on one connection; interleaved,
//! they all end within a few frames of each other, libcurl reports two or
//! more done in one call, and the rest of them wait for an event that may
//! never come: the last reads of a download stalled for ever in 4 of 20
//! pulls (release build), in 0 of 20 sent in turns. Clients that read
//! their streams concurrently lose nothing (the connection carries the
//! same bytes); a stream that waits for its turn has sent its headers.
//!
//! A turn is handed on when its holder stops asking for data for
//! [`HANDOFF`]: hyper asks for more only while the stream's flow-control
//! window and the connection's send buffer have room, so a client that
//! reads another stream first (a later one) is never left waiting on one
//! it does not read. On a link slower than a chunk per [`HANDOFF`], turns
//! pass often and the streams are interleaved as before. A turn also ends
//! after [`QUANTUM`] bytes when others wait, and its holder goes to the
//! back of the line: a small response (extents, a checksum) never waits
//! for the whole of a large download on the same connection.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

/// How long a turn stays with a body that does not ask for data.
pub const HANDOFF: Duration = Duration::from_millis(50);
/// Bytes a body sends in one turn while others wait: more than QEMU's
/// range reads (2 MiB and 256 KiB of readahead), so those go out whole.
pub const QUANTUM: u64 = 4 << 20;

/// The turns of one connection.
#[derive(Default)]
pub struct Turns {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// The body that holds the turn, and when it last asked for data.
    holder: Option<(u64, Instant)>,
    /// Bodies waiting for the turn, in the order they first asked.
    waiting: VecDeque<(u64, Waker)>,
}

impl Turns {
    /// A place in line for one response body.
    pub fn join(self: &Arc<Self>) -> Turn {
        let mut state = self.state.lock();
        let id = state.next_id;
        state.next_id += 1;
        Turn { turns: self.clone(), id, handoff: None, sent: 0 }
    }
}

/// A response body's place in its connection's line.
pub struct Turn {
    turns: Arc<Turns>,
    id: u64,
    /// Wakes a waiting body when the holder's turn would run out.
    handoff: Option<Pin<Box<Sleep>>>,
    /// Bytes sent in the current turn.
    sent: u64,
}

impl Turn {
    /// Ready while this body holds the turn (taking it when it is free, or
    /// when its holder has not asked for data for [`HANDOFF`] and this
    /// body is first in line); otherwise it waits in line.
    pub fn poll_hold(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        let mut state = self.turns.state.lock();
        let free_at = match state.holder {
            Some((holder, _)) if holder == self.id => {
                state.holder = Some((self.id, now));
                return Poll::Ready(());
            }
            Some((_, active)) => active + HANDOFF,
            None => now,
        };
        let first = state.waiting.front().is_none_or(|(id, _)| *id == self.id);
        if first && free_at <= now {
            state.waiting.pop_front();
            state.holder = Some((self.id, now));
            self.handoff = None;
            self.sent = 0;
            // The next in line is first now: it sets its own handoff timer.
            if let Some((_, waker)) = state.waiting.front() {
                waker.wake_by_ref();
            }
            return Poll::Ready(());
        }
        match state.waiting.iter_mut().find(|(id, _)| *id == self.id) {
            Some((_, waker)) => waker.clone_from(cx.waker()),
            None => state.waiting.push_back((self.id, cx.waker().clone())),
        }
        drop(state);
        if first {
            // The holder may stop asking without ending: look again when
            // its turn would run out.
            let sleep = self.handoff.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(free_at)));
            if sleep.deadline() != free_at {
                sleep.as_mut().reset(free_at);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }

    /// Counts bytes sent in this turn; past [`QUANTUM`], the turn goes to
    /// the next in line, if any, and this body waits at the back.
    pub fn sent(&mut self, bytes: u64) {
        self.sent += bytes;
        if self.sent < QUANTUM {
            return;
        }
        self.sent = 0;
        let mut state = self.turns.state.lock();
        if state.holder.is_some_and(|(holder, _)| holder == self.id) {
            if let Some((_, waker)) = state.waiting.front() {
                waker.wake_by_ref();
                state.holder = None;
            }
        }
    }

    /// Gives the turn up (the body ended) and wakes the next in line.
    pub fn release(&mut self) {
        let mut state = self.turns.state.lock();
        state.waiting.retain(|(id, _)| *id != self.id);
        if state.holder.is_some_and(|(holder, _)| holder == self.id) {
            state.holder = None;
        }
        if state.holder.is_none() {
            if let Some((_, waker)) = state.waiting.front() {
                waker.wake_by_ref();
            }
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    fn hold(turn: &mut Turn) -> Poll<()> {
        let waker = Waker::noop();
        turn.poll_hold(&mut Context::from_waker(waker))
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_take_turns_in_the_order_they_asked() {
        let turns = Arc::new(Turns::default());
        let (mut first, mut second, mut third) = (turns.join(), turns.join(), turns.join());
        assert!(hold(&mut second).is_ready(), "a free turn goes to whoever asks");
        assert!(hold(&mut first).is_pending());
        assert!(hold(&mut third).is_pending());
        second.release();
        assert!(hold(&mut third).is_pending(), "the first in line is next");
        assert!(hold(&mut first).is_ready());
        drop(first);
        assert!(hold(&mut third).is_ready(), "a dropped body gives its turn up");
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_stops_asking_loses_its_turn_after_the_handoff_time() {
        let turns = Arc::new(Turns::default());
        let (mut reader, mut waiting) = (turns.join(), turns.join());
        assert!(hold(&mut reader).is_ready());
        tokio::time::advance(HANDOFF / 2).await;
        assert!(hold(&mut reader).is_ready(), "asking again keeps the turn");
        let started = Instant::now();
        poll_fn(|cx| waiting.poll_hold(cx)).await;
        assert_eq!(started.elapsed(), HANDOFF, "taken once the holder was idle for the handoff time");
        assert!(hold(&mut reader).is_pending(), "the old holder waits in line");
        waiting.release();
        assert!(hold(&mut reader).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn each_body_in_line_gets_the_turn_when_the_ones_before_it_stop_asking() {
        let turns = Arc::new(Turns::default());
        let (mut first, mut second, mut third) = (turns.join(), turns.join(), turns.join());
        assert!(hold(&mut first).is_ready());
        assert!(hold(&mut second).is_pending());
        assert!(hold(&mut third).is_pending(), "not first in line: no handoff timer of its own yet");
        let started = Instant::now();
        let third = tokio::spawn(async move {
            poll_fn(|cx| third.poll_hold(cx)).await;
            started.elapsed()
        });
        poll_fn(|cx| second.poll_hold(cx)).await;
        assert_eq!(started.elapsed(), HANDOFF);
        let took = tokio::time::timeout(10 * HANDOFF, third).await.expect("the third never took the turn").unwrap();
        assert_eq!(took, 2 * HANDOFF, "woken when it became first, it took the turn from the idle second");
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_body_gives_its_turn_up_after_a_quantum_when_others_wait() {
        let turns = Arc::new(Turns::default());
        let mut large = turns.join();
        assert!(hold(&mut large).is_ready());
        large.sent(QUANTUM);
        assert!(hold(&mut large).is_ready(), "nobody waits: the turn stays");
        let mut small = turns.join();
        assert!(hold(&mut small).is_pending());
        large.sent(QUANTUM / 2);
        assert!(hold(&mut large).is_ready());
        large.sent(QUANTUM / 2);
        assert!(hold(&mut large).is_pending(), "a quantum sent while another waits");
        assert!(hold(&mut small).is_ready());
        small.release();
        assert!(hold(&mut large).is_ready());
    }
}
