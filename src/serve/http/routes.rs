//! What each route answers: scripts, blobs, overlays, loader reports, heartbeats, metrics, the status page.

use std::net::IpAddr;

use super::request::{parse_range, percent_decode, Request, Unsatisfiable};
use super::{canonical, Body, HttpEvent, Response, Shared};
use crate::net::Mac;
use crate::recipe::UnknownPolicy;
use crate::serve::site::Site;
use crate::serve::state::State;

pub(super) fn route(site: &Site, req: &Request, client: IpAddr, shared: &Shared) -> Response {
    let decoded = percent_decode(req.path.split('?').next().unwrap_or(""));
    let path = decoded.as_str();
    let event = |mac: Mac, kind: &'static str, detail: String| {
        shared.event(HttpEvent { mac: Some(mac), client, kind, detail });
    };
    if let Some(mac) = path.strip_prefix("/heartbeat/") {
        if !req.post {
            let mut r = Response::text(405, "Method Not Allowed", "heartbeats are POSTed\n".into());
            r.headers.push(("Allow", "POST".into()));
            return r;
        }
        let answer = crate::serve::heartbeat::handle(site, shared, mac, client, &req.body);
        let ctype = if answer.status == 200 { "application/json" } else { "text/plain; charset=utf-8" };
        let mut r = Response::with_type(answer.status, answer.reason, ctype, answer.body.into_bytes());
        if let Some(secs) = answer.retry_after {
            r.headers.push(("Retry-After", secs.to_string()));
        }
        return r;
    }
    if req.post {
        let mut r = Response::text(405, "Method Not Allowed", "only heartbeats are POSTed\n".into());
        r.headers.push(("Allow", "GET, HEAD".into()));
        return r;
    }
    if path == "/healthz" {
        return Response::text(200, "OK", "ok\n".into());
    }
    if path == "/metrics" {
        let text =
            crate::serve::metrics::render(site, shared.status.as_deref(), &shared.limits, shared.state.as_deref());
        return Response::with_type(200, "OK", "text/plain; version=0.0.4; charset=utf-8", text.into_bytes());
    }
    if path == "/" {
        return status_page(site, shared);
    }
    if let Some(m) = path.strip_prefix("/ipxe/") {
        let Ok(mac) = m.parse::<Mac>() else {
            return Response::text(400, "Bad Request", format!("{m:?} is not a MAC address\n"));
        };
        // `?arch=`: the architecture the machine's iPXE reported, when its script asked it to.
        let firmware = req.path.split_once('?').and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("arch=")));
        let script = site.script(mac, firmware.map(percent_decode).as_deref());
        // `unknown = "ignore"`: a machine outside the node list leaves no trace.
        if site.node(mac).is_some() || site.server.unknown != UnknownPolicy::Ignore {
            match &script.mismatch {
                Some(problem) => event(mac, "arch-mismatch", problem.clone()),
                None => {
                    event(mac, "script", site.node(mac).map(|n| n.name.clone()).unwrap_or_else(|| "unknown".into()))
                }
            }
        }
        let mut r = Response::text(200, "OK", script.text);
        r.headers.push(("Cache-Control", "no-store".into()));
        return r;
    }
    if let Some(m) = path.strip_prefix("/overlay/") {
        let Ok(mac) = m.parse::<Mac>() else {
            return Response::text(400, "Bad Request", format!("{m:?} is not a MAC address\n"));
        };
        if site.node(mac).is_some() && !overlay_allowed(site, shared.state.as_deref(), mac, client) {
            return Response::text(
                403,
                "Forbidden",
                format!(
                    "the overlay of {mac} is served only to that node's address (its reservation or lease); \
                     {client} is neither (set [server] overlay_allow for relayed or NATed sites)\n"
                ),
            );
        }
        return match site.overlays.get(&mac) {
            Some(bytes) => {
                event(mac, "overlay", format!("{} bytes", bytes.len()));
                if let Some(status) = &shared.status {
                    status.overlay_served(mac, canonical(client));
                }
                let runs = |arch: &str| {
                    site.node(mac).and_then(|n| site.bundles.get(&n.image)).is_some_and(|b| b.arch == arch)
                };
                let (body, len) = match shared.agent.as_ref().filter(|a| runs(a.arch)) {
                    Some(agent) => {
                        (Body::Pair(bytes.clone(), agent.archive.clone()), bytes.len() + agent.archive.len())
                    }
                    None => (Body::Bytes(bytes.clone()), bytes.len()),
                };
                Response {
                    blob: None,
                    status: 200,
                    reason: "OK",
                    headers: vec![
                        ("Content-Type", "application/octet-stream".into()),
                        ("Cache-Control", "no-store".into()),
                    ],
                    len: len as u64,
                    body,
                }
            }
            None => Response::text(404, "Not Found", format!("{mac} is not a known node\n")),
        };
    }
    if let Some(m) = path.strip_prefix("/loader/") {
        let Ok(mac) = m.parse::<Mac>() else {
            return Response::text(400, "Bad Request", format!("{m:?} is not a MAC address\n"));
        };
        if !overlay_allowed(site, shared.state.as_deref(), mac, client) {
            return Response::text(403, "Forbidden", format!("{client} is not the address of {mac}\n"));
        }
        return match crate::serve::loader::parse_report(req.path.split_once('?').map(|(_, q)| q).unwrap_or("")) {
            Ok(detail) => {
                event(mac, "loader", detail);
                Response::text(200, "OK", "ok\n".into())
            }
            Err(why) => Response::text(400, "Bad Request", format!("{why}\n")),
        };
    }
    if let Some(hex) = path.strip_prefix("/blob/sha256/") {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Response::text(400, "Bad Request", "a blob is named by 64 lowercase hex digits\n".into());
        }
        let Some(blob) = site.blobs.get(hex) else {
            return Response::text(404, "Not Found", format!("no blob sha256:{hex} here\n"));
        };
        let etag = format!("\"sha256:{hex}\"");
        let common = vec![
            ("ETag", etag.clone()),
            ("Cache-Control", "public, max-age=31536000, immutable".to_string()),
            ("Accept-Ranges", "bytes".to_string()),
            ("Content-Type", "application/octet-stream".to_string()),
        ];
        if req.if_none_match.as_deref().is_some_and(|v| v == "*" || v.split(',').any(|t| t.trim() == etag)) {
            return Response {
                status: 304,
                reason: "Not Modified",
                headers: common,
                body: Body::None,
                len: 0,
                blob: None,
            };
        }
        let range = match req.range.as_deref().map(|r| parse_range(r, blob.size)) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(r))) => Some(r),
            Some(Err(Unsatisfiable)) => {
                let mut r = Response::text(416, "Range Not Satisfiable", "range not satisfiable\n".into());
                r.headers.push(("Content-Range", format!("bytes */{}", blob.size)));
                return r;
            }
        };
        let mut headers = common;
        let (status, reason, start, len) = match range {
            Some((a, b)) => {
                headers.push(("Content-Range", format!("bytes {a}-{b}/{}", blob.size)));
                (206, "Partial Content", a, b - a + 1)
            }
            None => (200, "OK", 0, blob.size),
        };
        return Response {
            status,
            reason,
            headers,
            body: Body::File { path: blob.path.clone(), start, len },
            len,
            blob: Some(blob.label.clone()),
        };
    }
    // Firmware files, for UEFI HTTP boot (DHCP gives such clients http://SERVER/<name>).
    let wanted = path.trim_start_matches('/');
    if let Some(file) = site.boot_files.by_name(wanted) {
        let file = &file.path;
        return match std::fs::metadata(file) {
            Ok(m) => Response {
                blob: None,
                status: 200,
                reason: "OK",
                headers: vec![("Content-Type", "application/octet-stream".into())],
                len: m.len(),
                body: Body::File { path: file.clone(), start: 0, len: m.len() },
            },
            Err(e) => Response::text(500, "Internal Server Error", format!("{wanted}: {e}\n")),
        };
    }
    Response::text(404, "Not Found", "not found\n".into())
}

/// Whether a `/ipxe/{mac}` path names a node (its script boots it).
pub(super) fn is_node_script(site: &Site, path: &str) -> bool {
    let path = percent_decode(path.split('?').next().unwrap_or(""));
    path.strip_prefix("/ipxe/").and_then(|m| m.parse::<Mac>().ok()).is_some_and(|mac| site.node(mac).is_some())
}

/// Whether `client` may have the overlay of node `mac`: it is the node's reserved address, the address leased to
/// it (or, in proxy mode, the address it was seen requesting from the site's DHCP server), or inside
/// `[server] overlay_allow`. Overlays carry hosts files, keys and the admin's templates (sites put
/// secrets there), and MACs are easy to guess.
fn overlay_allowed(site: &Site, state: Option<&State>, mac: Mac, client: IpAddr) -> bool {
    let in_allowed =
        matches!(canonical(client), IpAddr::V4(v4) if site.overlay_allow.iter().any(|net| net.contains(v4)));
    in_allowed || is_node_address(site, state, mac, client)
}

/// Whether `client` is node `mac`'s own address: its reservation, or the address leased to it.
pub(in crate::serve) fn is_node_address(site: &Site, state: Option<&State>, mac: Mac, client: IpAddr) -> bool {
    let IpAddr::V4(v4) = canonical(client) else { return false };
    if site.node(mac).and_then(|n| n.ipv4) == Some(v4) {
        return true;
    }
    state.and_then(|s| s.address_of(mac, crate::util::unix_now())) == Some(v4)
}

/// The status page, from the server's view of its nodes and the latest boot events.
fn status_page(site: &Site, shared: &Shared) -> Response {
    let now = crate::util::unix_now();
    let state = shared.state.as_deref();
    let rows = match &shared.status {
        Some(tracker) => tracker.status(site, state, false).unwrap_or_default(),
        None => crate::serve::status::nodes_status(&site.nodes, &Default::default(), |_| None, now, 30),
    };
    let events = state.and_then(|s| s.events(None, crate::serve::page::EVENTS_SHOWN).ok()).unwrap_or_default();
    let html = crate::serve::page::render(site, &rows, &events, &shared.limits.snapshot(), now);
    Response::with_type(200, "OK", "text/html; charset=utf-8", html.into_bytes())
}

/// The route a path takes, as a metrics label.
pub(super) fn route_label(site: &Site, path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or("");
    let prefixes = [("/ipxe/", "ipxe"), ("/blob/", "blob"), ("/overlay/", "overlay"), ("/heartbeat/", "heartbeat")];
    if let Some((_, label)) = prefixes.iter().find(|(p, _)| path.starts_with(p)) {
        return label;
    }
    match path {
        "/metrics" => "metrics",
        "/" => "status",
        "/healthz" => "healthz",
        p if site.boot_files.by_name(p.trim_start_matches('/')).is_some() => "boot_file",
        _ => "other",
    }
}
