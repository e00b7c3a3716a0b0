//! Bounded retries with exponential backoff, so a network blip or a
//! qemu-nbd restart (502 for a moment) does not fail a long backup, while
//! a real failure still surfaces after a short while.

use std::future::Future;
use std::time::Duration;

use crate::error::Result;

/// The log target of retry notices, so a CLI can show them alone.
pub const RETRY_LOG: &str = "blockgate_client::retry";

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub first_delay: Duration,
    /// Longest wait between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 6, first_delay: Duration::from_millis(250), max_delay: Duration::from_secs(4) }
    }
}

impl RetryPolicy {
    /// Runs `operation` until it succeeds, fails with an error that is not
    /// retryable, or runs out of attempts.
    pub async fn run<T, F, Fut>(&self, what: &str, mut operation: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 1;
        loop {
            match operation().await {
                Ok(value) => return Ok(value),
                Err(error) => self.pause(what, error, &mut attempt).await?,
            }
        }
    }

    /// After a failed attempt: waits before the next one and counts it, or
    /// gives the error back when it is not worth retrying or attempts are
    /// used up. For callers that keep state across attempts (a read that
    /// resumes where the last one stopped).
    pub async fn pause(&self, what: &str, error: crate::ClientError, attempt: &mut u32) -> Result<()> {
        if !error.is_retryable() || *attempt >= self.attempts {
            return Err(error);
        }
        let delay = (0..*attempt - 1).fold(self.first_delay, |delay, _| (delay * 2).min(self.max_delay));
        let error = crate::error::chain(&error);
        tracing::warn!(target: RETRY_LOG, "{what} failed ({error}); retrying in {delay:?} (attempt {} of {})", *attempt + 1, self.attempts);
        tokio::time::sleep(delay).await;
        *attempt += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ClientError;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy { attempts, first_delay: Duration::from_millis(1), max_delay: Duration::from_millis(2) }
    }

    #[tokio::test]
    async fn retries_retryable_errors_until_success() {
        let calls = AtomicU32::new(0);
        let result = quick(5)
            .run("test", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(ClientError::ShortRead { offset: 0, expected: 2, got: 1 })
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn gives_up_after_the_last_attempt_and_at_once_on_client_errors() {
        let calls = AtomicU32::new(0);
        let result: Result<()> = quick(3)
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(ClientError::ShortRead { offset: 0, expected: 2, got: 1 })
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let calls = AtomicU32::new(0);
        let result: Result<()> = quick(3)
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(ClientError::Invalid("no".into()))
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
