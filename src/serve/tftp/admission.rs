//! Which read requests get a transfer: at most `max_transfers` running at once, and at most `max_per_client` for
//! one client address. Each admitted transfer holds a [`Permit`] until it ends, on whatever thread it runs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Which limit a refused request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// `max_per_client`: that address has as many transfers as it may.
    Client,
    /// `max_transfers`: the server has as many transfers as it may.
    Total,
}

/// Transfers running, in total and per client address.
#[derive(Debug, Default)]
struct Running {
    total: usize,
    /// Only addresses with a transfer running: the map never outgrows `max_transfers` entries.
    per_client: HashMap<IpAddr, usize>,
}

impl Running {
    /// Counts a new transfer for `client` unless that would pass a limit (each taken as at least 1). The
    /// per-client limit is checked first, so a host that floods is reported as such even when the server is full.
    fn admit(&mut self, client: IpAddr, max_total: usize, max_per_client: usize) -> Result<(), Full> {
        let mine = self.per_client.get(&client).copied().unwrap_or(0);
        if mine >= max_per_client.max(1) {
            return Err(Full::Client);
        }
        if self.total >= max_total.max(1) {
            return Err(Full::Total);
        }
        self.total += 1;
        self.per_client.insert(client, mine + 1);
        Ok(())
    }

    fn release(&mut self, client: IpAddr) {
        match self.per_client.get_mut(&client) {
            Some(1) => {
                self.per_client.remove(&client);
            }
            Some(mine) => *mine -= 1,
            None => return,
        }
        self.total -= 1;
    }
}

/// The admission state shared by the listening loop and the transfers' threads.
#[derive(Debug, Default)]
pub(super) struct Admission {
    running: Mutex<Running>,
    /// Woken when the last running transfer ends (shutdown waits for it).
    idle: Notify,
}

/// A running transfer's place; dropping it (when the transfer's thread ends, or fails to start) frees the place.
#[derive(Debug)]
pub(super) struct Permit {
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Admission {
    fn lock(&self) -> MutexGuard<'_, Running> {
        // The counts stay consistent even if a holder panicked: every update is a single step under the lock.
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for one more transfer from `client`, or the limit that refuses it.
    pub(super) fn try_admit(
        self: &Arc<Self>,
        client: IpAddr,
        max_total: usize,
        max_per_client: usize,
    ) -> Result<Permit, Full> {
        self.lock().admit(client, max_total, max_per_client)?;
        Ok(Permit { admission: self.clone(), client })
    }

    /// Transfers running now.
    pub(super) fn running(&self) -> usize {
        self.lock().total
    }

    /// Returns once no transfer is running.
    pub(super) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before looking, so a transfer ending in between still wakes us.
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut running = self.admission.lock();
        running.release(self.client);
        if running.total == 0 {
            drop(running);
            self.admission.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 4, 0, last))
    }

    #[test]
    fn per_client_limit_then_total_limit() {
        let mut running = Running::default();
        for _ in 0..3 {
            assert_eq!(running.admit(ip(1), 5, 3), Ok(()));
        }
        // The fourth from the same address is refused; other addresses still get in, up to the total.
        assert_eq!(running.admit(ip(1), 5, 3), Err(Full::Client));
        assert_eq!(running.admit(ip(2), 5, 3), Ok(()));
        assert_eq!(running.admit(ip(3), 5, 3), Ok(()));
        assert_eq!(running.admit(ip(4), 5, 3), Err(Full::Total));
        // With both limits reached, the flooding address is named by its own limit.
        assert_eq!(running.admit(ip(1), 5, 3), Err(Full::Client));
        assert_eq!(running.total, 5);
        running.release(ip(2));
        assert_eq!(running.admit(ip(4), 5, 3), Ok(()));
        for _ in 0..3 {
            running.release(ip(1));
        }
        assert!(!running.per_client.contains_key(&ip(1)), "an address without transfers is forgotten");
        assert_eq!(running.total, 2);
        // Releasing what was never admitted changes nothing.
        running.release(ip(9));
        assert_eq!(running.total, 2);
    }

    #[test]
    fn zero_limits_still_admit_one() {
        let mut running = Running::default();
        assert_eq!(running.admit(ip(1), 0, 0), Ok(()));
        assert_eq!(running.admit(ip(1), 0, 0), Err(Full::Client));
        assert_eq!(running.admit(ip(2), 0, 0), Err(Full::Total));
    }

    #[test]
    fn permits_free_their_place_when_dropped() {
        let admission = Arc::new(Admission::default());
        let permits: Vec<Permit> = (0..8).map(|_| admission.try_admit(ip(1), 512, 8).unwrap()).collect();
        assert_eq!(admission.try_admit(ip(1), 512, 8).unwrap_err(), Full::Client);
        assert_eq!(admission.running(), 8);
        let on_a_thread = admission.try_admit(ip(2), 512, 8).unwrap();
        std::thread::spawn(move || drop(on_a_thread)).join().unwrap();
        drop(permits);
        assert_eq!(admission.running(), 0);
        assert!(admission.try_admit(ip(1), 512, 8).is_ok());
    }

    #[tokio::test]
    async fn idle_waits_for_the_last_transfer() {
        let admission = Arc::new(Admission::default());
        admission.idle().await;
        let permit = admission.try_admit(ip(1), 512, 8).unwrap();
        let waiter = tokio::spawn({
            let admission = admission.clone();
            async move { admission.idle().await }
        });
        assert!(tokio::time::timeout(Duration::from_millis(50), admission.idle()).await.is_err());
        std::thread::spawn(move || drop(permit));
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("idle() not woken").unwrap();
    }
}
