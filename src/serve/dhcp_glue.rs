//! Connects the site to the DHCP server: builds its context from the node list and the
//! `[server]` table, starts it, and hands it a new context whenever the site is reloaded.

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::{mpsc, watch};

use super::dhcp::{self, DhcpContext, DhcpEvent, Reservation};
use super::site::Site;
use super::state::State;
use crate::net::Subnet;
use crate::recipe::DhcpMode;

/// The DHCP server's view of a site.
pub fn context(site: &Site) -> DhcpContext {
    let mut ctx = DhcpContext::new(site.dhcp_mode(), Subnet { addr: site.address, prefix: site.prefix });
    ctx.router = site.server.gateway;
    ctx.dns = site.server.dns.clone();
    ctx.domain = site.server.domain.clone();
    ctx.lease_secs = site.server.lease_time.unwrap_or(3600);
    ctx.pool = site.server.pool;
    ctx.http_base = site.base_url();
    ctx.unknown = site.server.unknown.clone();
    for n in &site.nodes {
        ctx.known.insert(n.mac);
        if let Some(ip) = n.ipv4 {
            ctx.reservations.insert(n.mac, Reservation { ip, hostname: Some(n.hostname.clone()) });
        }
    }
    ctx.boot_files = site.boot_files.clone();
    ctx
}

/// Starts DHCP unless the site says `off`; returns its event stream.
pub fn start(
    tasks: &mut tokio::task::JoinSet<Result<()>>,
    site: &watch::Receiver<Arc<Site>>,
    state: Arc<State>,
    queue: usize,
    stop: watch::Receiver<bool>,
) -> Result<Option<mpsc::Receiver<DhcpEvent>>> {
    let current = site.borrow().clone();
    if current.dhcp_mode() == DhcpMode::Off {
        return Ok(None);
    }
    let port = current.server.dhcp_port.unwrap_or(67);
    let proxy_port = (current.dhcp_mode() == DhcpMode::Proxy).then_some(4011);
    // Bound here, before the caller says it is ready: a port in use is an error at start, not later.
    let sockets = dhcp::Sockets::bind(current.server.interface.as_deref(), port, proxy_port)?;
    let (ctx_tx, ctx_rx) = watch::channel(Arc::new(context(&current)));
    let mut follow = site.clone();
    let mut follow_stop = stop.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                changed = follow.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let next = context(&follow.borrow());
                    if ctx_tx.send(Arc::new(next)).is_err() {
                        break;
                    }
                }
                _ = follow_stop.wait_for(|s| *s) => break,
            }
        }
        Ok(())
    });
    let (tx, rx) = mpsc::channel(queue.max(1));
    let mut stop = stop;
    tasks.spawn(dhcp::serve_on(sockets, ctx_rx, state, Some(tx), async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    Ok(Some(rx))
}
