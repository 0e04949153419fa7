//! The control socket: while `kiln serve` runs it holds the state database's lock, so other kiln commands
//! (`kiln node ls --unknown`, `kiln node events`, `kiln node status`) ask the server over `<state dir>/kiln.sock`
//! (one JSON line each way); when no server runs they open the database themselves.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::state::State;
use super::status::Live;
use crate::net::Mac;

/// The control socket `kiln serve` listens on in its state directory: while it runs, the database is locked and
/// other kiln commands ask the server instead.
pub const SOCKET: &str = "kiln.sock";

/// A question about the state, answered from the database or, while `kiln serve` holds it, by the server over
/// [`SOCKET`] (one JSON line each way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "lowercase", deny_unknown_fields)]
pub enum Query {
    /// Counts of leases, discovered machines and boot events.
    Summary,
    /// Every lease.
    Leases,
    /// Every discovered machine.
    Discovered,
    /// The last `limit` boot events, of one MAC (`52:54:00:…`) or of all.
    Events { mac: Option<Mac>, limit: usize },
    /// Every node's status ([`super::status::NodeStatus`]); with `unknown`, other machines' too. Only a running
    /// server answers it from the socket; without one, [`super::status::query`] reads the database and the recipe.
    Status {
        #[serde(default)]
        unknown: bool,
    },
}

impl State {
    /// Answers `query` from this database.
    pub fn answer(&self, query: &Query) -> Result<serde_json::Value> {
        Ok(match query {
            Query::Summary => serde_json::to_value(self.summary()?)?,
            Query::Leases => serde_json::to_value(self.leases()?)?,
            Query::Discovered => serde_json::to_value(self.discovered()?)?,
            Query::Events { mac, limit } => serde_json::to_value(self.events(*mac, *limit)?)?,
            Query::Status { .. } => bail!("the nodes' status needs the recipe: ask with serve::status::query"),
        })
    }
}

/// Answers `query` about the state in `dir`: from the running server if one holds it, else from the database
/// (created if missing).
pub fn ask(dir: &Path, query: &Query) -> Result<serde_json::Value> {
    match ask_running(dir, query)? {
        Some(answer) => Ok(answer),
        None => State::open(dir)?.answer(query),
    }
}

/// Asks the server that holds the state in `dir`; `None` when none runs there.
pub fn ask_running(dir: &Path, query: &Query) -> Result<Option<serde_json::Value>> {
    let socket = dir.join(SOCKET);
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(stream) => ask_server(stream, &socket, query).map(Some),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("connecting to {}", socket.display())),
    }
}

fn ask_server(mut stream: std::os::unix::net::UnixStream, socket: &Path, query: &Query) -> Result<serde_json::Value> {
    use std::io::{BufRead, Write};
    let timeout = Some(std::time::Duration::from_secs(10));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut line = serde_json::to_vec(query)?;
    line.push(b'\n');
    stream.write_all(&line).with_context(|| format!("asking kiln serve over {}", socket.display()))?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading kiln serve's answer over {}", socket.display()))?;
    let reply: Reply = serde_json::from_str(&answer)
        .with_context(|| format!("kiln serve answered {} with something that is not a reply", socket.display()))?;
    match reply {
        Reply { ok: true, data: Some(data), .. } => Ok(data),
        Reply { error, .. } => bail!("kiln serve ({}): {}", socket.display(), error.unwrap_or_default()),
    }
}

/// One answer on the control socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// The reply to one request line; `live` answers [`Query::Status`].
    pub fn to_line(state: &State, live: Option<&Live>, line: &[u8]) -> Vec<u8> {
        let reply = match serde_json::from_slice::<Query>(line) {
            Err(e) => Reply { ok: false, data: None, error: Some(format!("not a query: {e}")) },
            Ok(q) => match answer(state, live, &q) {
                Ok(data) => Reply { ok: true, data: Some(data), error: None },
                Err(e) => Reply { ok: false, data: None, error: Some(format!("{e:#}")) },
            },
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        out
    }
}

fn answer(state: &State, live: Option<&Live>, query: &Query) -> Result<serde_json::Value> {
    match (query, live) {
        (Query::Status { unknown }, Some(live)) => {
            let site = live.site.borrow().clone();
            Ok(serde_json::to_value(live.tracker.status(&site, Some(state), *unknown)?)?)
        }
        _ => state.answer(query),
    }
}

/// Binds the control socket (replacing a stale one: this process holds the state's lock); on failure says what
/// does not work without it and goes on.
pub fn bind(socket: &std::path::Path) -> Option<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(socket);
    let bound = tokio::net::UnixListener::bind(socket).and_then(|l| {
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    });
    match bound {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!(
                "kiln serve: warning: no control socket at {} ({e}): `kiln node ls --unknown` and `kiln node events` \
                 cannot read the state while this server runs",
                socket.display()
            );
            None
        }
    }
}

/// Answers [`Query`] lines on the control socket until `stop`; `live` answers [`Query::Status`].
pub async fn serve(
    listener: tokio::net::UnixListener,
    state: Arc<State>,
    live: Option<Live>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return Ok(());
                }
                continue;
            }
        };
        let (state, live) = (state.clone(), live.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = Vec::new();
            let mut reader = tokio::io::BufReader::new(read.take(64 * 1024));
            let got =
                tokio::time::timeout(std::time::Duration::from_secs(10), reader.read_until(b'\n', &mut line)).await;
            if !matches!(got, Ok(Ok(n)) if n > 0) {
                return;
            }
            let answer = tokio::task::spawn_blocking(move || Reply::to_line(&state, live.as_ref(), &line)).await;
            if let Ok(answer) = answer {
                let _ = write.write_all(&answer).await;
            }
        });
    }
}
