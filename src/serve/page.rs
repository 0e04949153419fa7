//! `GET /`: the status page. One HTML document rendered on the server, with its style inline and no script and
//! no external asset (it works from an air-gapped site's browser, and in a terminal browser), that reloads itself:
//! the site's nodes with their state, the recent boot events, and what the server listens on and how.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::site::Site;
use super::state::BootEvent;
use super::status::{heartbeat_of, NodeState, NodeStatus};
use crate::util::{human_size, utc_time};

/// Boot events shown.
pub const EVENTS_SHOWN: usize = 40;

/// `text` with `&`, `<`, `>`, `"` and `'` escaped for HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number of seconds for people: `42 s`, `7 min`, `3 h 05 min`, `2 d 4 h`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..86_400 => format!("{} h {:02} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
    }
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2433;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.sub{color:#5a6478;margin:0 0 1em}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:.3em .7em;text-align:left;border-bottom:1px solid #e4e7ec;white-space:nowrap}
th{background:#f0f2f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,monospace;font-size:.92em}
.state{font-weight:600;border-radius:3px;padding:.1em .5em;color:#fff}
.s-off{background:#8a94a6}.s-booting{background:#d08a00}.s-up{background:#1f9d55}.s-lost{background:#d0342c}
.s-unknown{background:#5b6fa8}
.counts span{margin-right:1em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;margin:0}dt{color:#5a6478}dd{margin:0}
";

/// Renders the page: `rows` are the nodes' status, `events` the latest boot events (oldest first), `limits` the
/// limits' refusals so far, `now` unix seconds.
pub fn render(
    site: &Site,
    rows: &[NodeStatus],
    events: &[BootEvent],
    limits: &BTreeMap<&'static str, u64>,
    now: u64,
) -> String {
    let heartbeat = heartbeat_of(site.server.heartbeat);
    let refresh = heartbeat.clamp(2, 10);
    let mut h = String::with_capacity(16 * 1024 + rows.len() * 400);
    let title = format!("kiln serve {}", site.address);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{}</title><style>{STYLE}</style></head><body>\n",
        escape(&title)
    );
    let _ = writeln!(
        h,
        "<h1>{}</h1><p class=\"sub\">{} nodes · updated {} UTC · reloads every {refresh} s</p>",
        escape(&title),
        site.nodes.len(),
        utc_time(now)
    );
    h.push_str("<p class=\"counts\" id=\"counts\">");
    for state in [NodeState::Up, NodeState::Booting, NodeState::Lost, NodeState::Off] {
        let n = rows.iter().filter(|r| r.state == state).count();
        let _ = write!(h, "<span><span class=\"state s-{state}\">{state}</span> {n}</span>");
    }
    h.push_str("</p>\n");

    h.push_str(
        "<h2>Nodes</h2>\n<table id=\"nodes\"><thead><tr><th>node</th><th>state</th><th>stage</th><th>image</th>\
                <th>address</th><th>MAC</th><th>last seen</th><th>booted</th><th>uptime</th><th>load</th>\
                <th>memory</th><th>kernel</th></tr></thead><tbody>\n",
    );
    for r in rows {
        let name = r.node.as_deref().unwrap_or("(unknown)");
        let dash = || "–".to_string();
        let _ = writeln!(
            h,
            "<tr data-node=\"{}\" data-state=\"{}\"><td>{}</td><td><span class=\"state s-{}\">{}</span></td><td>{}</td>\
             <td>{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"mono\">{}</td></tr>",
            escape(name),
            r.state,
            escape(name),
            r.state,
            r.state,
            escape(r.stage.as_deref().unwrap_or("–")),
            escape(&match (&r.image, &r.image_digest) {
                (Some(i), Some(d)) => format!("{i} ({})", super::heartbeat::short_digest(d)),
                (Some(i), None) => i.clone(),
                (None, _) => dash(),
            }),
            r.address.map(|a| a.to_string()).unwrap_or_else(dash),
            r.mac,
            r.last_seen.map(|t| format!("{} ago", duration(now.saturating_sub(t)))).unwrap_or_else(|| "never".into()),
            // To the minute: the uptime beside it says the rest.
            r.booted
                .map(|t| {
                    let full = utc_time(t);
                    format!("{} UTC", full.get(..16).unwrap_or(&full))
                })
                .unwrap_or_else(dash),
            r.uptime.map(duration).unwrap_or_else(dash),
            r.load.map(|l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2])).unwrap_or_else(dash),
            match (r.mem_used, r.mem_total) {
                (Some(used), Some(total)) => format!("{} / {}", human_size(used), human_size(total)),
                _ => dash(),
            },
            escape(r.kernel.as_deref().unwrap_or("–")),
        );
    }
    h.push_str("</tbody></table>\n");

    let _ = writeln!(
        h,
        "<h2>Recent boot events</h2>\n<table id=\"events\"><thead><tr><th>time (UTC)</th><th>machine</th>\
                         <th>node</th><th>event</th><th>detail</th></tr></thead><tbody>"
    );
    for e in events.iter().rev() {
        let node = site.node(e.mac).map(|n| n.name.as_str()).unwrap_or("unknown");
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            utc_time(e.time),
            e.mac,
            escape(node),
            escape(&e.kind),
            escape(&e.detail)
        );
    }
    if events.is_empty() {
        h.push_str("<tr><td colspan=\"5\">none yet</td></tr>\n");
    }
    h.push_str("</tbody></table>\n");

    let server = &site.server;
    h.push_str("<h2>Server</h2>\n<dl id=\"server\">");
    let mut item = |k: &str, v: String| {
        let _ = write!(h, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(&v));
    };
    item("address", format!("{}/{}", site.address, site.prefix));
    item("interface", server.interface.clone().unwrap_or_else(|| "all interfaces".into()));
    item("DHCP", site.dhcp_mode().to_string());
    item("HTTP", site.base_url());
    item("TFTP port", server.tftp_port.unwrap_or(69).to_string());
    item("unknown machines", server.unknown.to_string());
    item("heartbeat", format!("every {heartbeat} s, lost after {} s", heartbeat * super::status::LOST_AFTER));
    item("images", site.bundles.keys().cloned().collect::<Vec<_>>().join(", "));
    let firmware: Vec<String> = site.boot_files.iter().map(|f| f.name.clone()).collect();
    item("firmware files", if firmware.is_empty() { "none".into() } else { firmware.join(", ") });
    let hit: Vec<String> = limits.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} ({n})")).collect();
    item("limits hit", if hit.is_empty() { "none".into() } else { hit.join(", ") });
    item("kiln", env!("CARGO_PKG_VERSION").to_string());
    h.push_str("</dl>\n<p class=\"sub\">Also: <a href=\"/metrics\">/metrics</a> (Prometheus).</p>\n</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_durations_read_well() {
        assert_eq!(escape("<a href='x'>&\"</a>"), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;");
        let cases = [
            (0, "0 s"),
            (59, "59 s"),
            (60, "1 min"),
            (3599, "59 min"),
            (3600, "1 h 00 min"),
            (3725, "1 h 02 min"),
            (90_000, "1 d 1 h"),
        ];
        for (secs, text) in cases {
            assert_eq!(duration(secs), text);
        }
    }
}
