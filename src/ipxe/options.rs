//! Build options: iPXE's `config/*.h` defines, turned on or off through `config/local/*.h`
//! headers (read after the platform defaults, so they win), never by editing the source.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Which builds a setting applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    /// x86 only: iPXE's serial console breaks the arm64 build.
    X86,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// `#define NAME [VALUE]`
    Define { value: Option<String>, scope: Scope },
    /// `#undef NAME`
    Undef,
}

/// kiln's defaults, the ones Warewulf's build script turns on: VLAN commands, serial and
/// framebuffer consoles, zlib and gzip images.
pub const DEFAULTS: [(&str, &str, Scope); 5] = [
    ("general.h", "VLAN_CMD", Scope::All),
    ("general.h", "IMAGE_ZLIB", Scope::All),
    ("general.h", "IMAGE_GZIP", Scope::All),
    ("console.h", "CONSOLE_SERIAL", Scope::X86),
    ("console.h", "CONSOLE_FRAMEBUFFER", Scope::All),
];

/// The settings of one build, by local header (`general.h`) and define.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub headers: BTreeMap<String, BTreeMap<String, Setting>>,
}

/// One `--option`/`--no-option` argument: `[HEADER:]NAME[=VALUE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OptionArg {
    header: Option<String>,
    name: String,
    value: Option<String>,
}

fn parse_arg(arg: &str, with_value: bool) -> Result<OptionArg> {
    let (header, rest) = match arg.split_once(':') {
        Some((h, rest)) => (Some(h), rest),
        None => (None, arg),
    };
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) if with_value => (n, Some(v)),
        Some(_) => bail!("{arg:?}: --no-option takes a name without a value"),
        None => (rest, None),
    };
    if name.is_empty()
        || name.starts_with(|c: char| c.is_ascii_digit())
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        bail!("{arg:?}: {name:?} is not a C macro name like DOWNLOAD_PROTO_HTTPS");
    }
    if let Some(v) = value {
        if v.contains(['\n', '\r']) || v.contains("\\\n") {
            bail!("{arg:?}: a value must fit on one line");
        }
    }
    let header = match header {
        Some(h) => {
            let h = if h.ends_with(".h") { h.to_string() } else { format!("{h}.h") };
            if h.contains('/') || h.starts_with('.') {
                bail!("{arg:?}: the header is a file name in src/config, like general.h or console.h");
            }
            Some(h)
        }
        None => None,
    };
    Ok(OptionArg { header, name: name.to_string(), value: value.map(str::to_string) })
}

/// Whether a header line defines, undefines or comments out a define of `name`
/// (`#define NAME`, `#undef NAME`, `//#define NAME`).
fn mentions(line: &str, name: &str) -> bool {
    let l = line.trim_start();
    let l = l.strip_prefix("//").unwrap_or(l).trim_start();
    let Some(l) = l.strip_prefix('#') else { return false };
    let l = l.trim_start();
    let Some(l) = l.strip_prefix("define").or_else(|| l.strip_prefix("undef")) else { return false };
    if !l.starts_with([' ', '\t']) {
        return false;
    }
    let word = l.trim_start().split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or("");
    word == name
}

/// The `.h` files of a directory (iPXE's `src/config`), in name order.
pub fn config_headers(config_dir: &Path) -> Result<Vec<String>> {
    let mut headers: Vec<_> = fs::read_dir(config_dir)
        .with_context(|| format!("reading {}", config_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".h"))
        .collect();
    headers.sort();
    Ok(headers)
}

/// The header of `config_dir` (iPXE's `src/config`) where `name` is defined.
pub fn find_header(config_dir: &Path, name: &str) -> Result<String> {
    for h in config_headers(config_dir)? {
        let p = config_dir.join(&h);
        let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        if text.lines().any(|l| mentions(l, name)) {
            return Ok(h);
        }
    }
    bail!(
        "option {name} is not defined in any {}/*.h of this iPXE source; check the spelling, or name \
         the header: --option general.h:{name}",
        config_dir.display()
    )
}

impl Config {
    /// kiln's defaults, then `options` (`[HEADER:]NAME[=VALUE]`) and `no_options`
    /// (`[HEADER:]NAME`). Names without a header are looked up in `config_dir`.
    pub fn resolve(options: &[String], no_options: &[String], config_dir: &Path) -> Result<Config> {
        let mut config = Config::default();
        for (header, name, scope) in DEFAULTS {
            config.set(header, name, Setting::Define { value: None, scope });
        }
        let locate = |arg: &OptionArg| match &arg.header {
            Some(h) => {
                if !config_dir.join(h).is_file() {
                    bail!("{h} is not a header in {}", config_dir.display());
                }
                Ok(h.clone())
            }
            None => find_header(config_dir, &arg.name),
        };
        let mut seen = BTreeMap::new();
        for raw in options {
            let arg = parse_arg(raw, true).context("--option")?;
            let header = locate(&arg).with_context(|| format!("--option {raw}"))?;
            seen.insert(arg.name.clone(), raw.clone());
            config.set(&header, &arg.name, Setting::Define { value: arg.value, scope: Scope::All });
        }
        for raw in no_options {
            let arg = parse_arg(raw, false).context("--no-option")?;
            if let Some(on) = seen.get(&arg.name) {
                bail!("--option {on} and --no-option {raw} contradict each other");
            }
            // kiln's defaults are known without reading the source.
            let header = match DEFAULTS.iter().find(|(_, n, _)| *n == arg.name) {
                Some((h, _, _)) if arg.header.is_none() => h.to_string(),
                _ => locate(&arg).with_context(|| format!("--no-option {raw}"))?,
            };
            config.set(&header, &arg.name, Setting::Undef);
        }
        Ok(config)
    }

    fn set(&mut self, header: &str, name: &str, setting: Setting) {
        // One setting per name: a later one (an --option over a default) replaces it wherever it was.
        for settings in self.headers.values_mut() {
            settings.remove(name);
        }
        self.headers.retain(|_, s| !s.is_empty());
        self.headers.entry(header.to_string()).or_default().insert(name.to_string(), setting);
    }

    /// `config/local/<header>` with these settings after `original` (the source's own local
    /// header, kept so a site's customisation survives).
    pub fn render(&self, header: &str, original: &str) -> Option<String> {
        let settings = self.headers.get(header)?;
        let mut out = String::from("/* Written by kiln build-ipxe from its options; rewritten on every build. */\n");
        if !original.is_empty() {
            out.push_str("\n/* The source tree's own config/local/");
            out.push_str(header);
            out.push_str(": */\n");
            out.push_str(original);
            if !original.ends_with('\n') {
                out.push('\n');
            }
        }
        out.push('\n');
        for (name, setting) in settings {
            match setting {
                Setting::Undef => out.push_str(&format!("#undef {name}\n")),
                Setting::Define { value, scope } => {
                    let define = match value {
                        Some(v) => format!("#undef {name}\n#define {name} {v}\n"),
                        None => format!("#undef {name}\n#define {name}\n"),
                    };
                    match scope {
                        Scope::All => out.push_str(&define),
                        Scope::X86 => {
                            out.push_str("#if defined ( __i386__ ) || defined ( __x86_64__ )\n");
                            out.push_str(&define);
                            out.push_str("#endif\n");
                        }
                    }
                }
            }
        }
        Some(out)
    }

    /// Every local header this build writes, by name, with the source's originals read from
    /// `local_dir` (its `src/config/local`).
    pub fn render_all(&self, local_dir: &Path) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for header in self.headers.keys() {
            let p = local_dir.join(header);
            let original = match fs::read_to_string(&p) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            };
            out.insert(header.clone(), self.render(header, &original).expect("the header has settings"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("general.h"),
            "#define VLAN_CMD\t/* VLAN */\n//#define IMAGE_ZLIB\n#undef DOWNLOAD_PROTO_HTTPS\n#define BANNER_TIMEOUT 20\n",
        )
        .unwrap();
        fs::write(d.path().join("console.h"), "  //#define CONSOLE_SERIAL\t/* Serial */\n#define KEYBOARD_MAP us\n")
            .unwrap();
        fs::write(d.path().join("crypto.h"), "#define CRYPTO_DIGEST_MD5\n").unwrap();
        d
    }

    #[test]
    fn defaults_are_warewulfs() {
        let d = config_dir();
        let c = Config::resolve(&[], &[], d.path()).unwrap();
        let general = c.render("general.h", "").unwrap();
        assert_eq!(
            general,
            "/* Written by kiln build-ipxe from its options; rewritten on every build. */\n\n\
             #undef IMAGE_GZIP\n#define IMAGE_GZIP\n#undef IMAGE_ZLIB\n#define IMAGE_ZLIB\n#undef VLAN_CMD\n#define VLAN_CMD\n"
        );
        let console = c.render("console.h", "").unwrap();
        assert!(
            console.contains(
                "#if defined ( __i386__ ) || defined ( __x86_64__ )\n#undef CONSOLE_SERIAL\n#define CONSOLE_SERIAL\n#endif\n"
            ),
            "serial only on x86: {console}"
        );
        assert!(console.contains("#undef CONSOLE_FRAMEBUFFER\n#define CONSOLE_FRAMEBUFFER\n"));
        assert_eq!(c.render("crypto.h", ""), None, "headers without settings are left alone");
    }

    #[test]
    fn options_go_to_the_header_that_defines_them() {
        let d = config_dir();
        let c = Config::resolve(
            &["DOWNLOAD_PROTO_HTTPS".into(), "BANNER_TIMEOUT=0".into(), "crypto:CRYPTO_DIGEST_SHA1".into()],
            &["CONSOLE_FRAMEBUFFER".into(), "CRYPTO_DIGEST_MD5".into()],
            d.path(),
        )
        .unwrap();
        let general = c.render("general.h", "").unwrap();
        assert!(general.contains("#undef DOWNLOAD_PROTO_HTTPS\n#define DOWNLOAD_PROTO_HTTPS\n"), "{general}");
        assert!(general.contains("#define BANNER_TIMEOUT 0\n"), "{general}");
        let console = c.render("console.h", "").unwrap();
        assert!(console.contains("#undef CONSOLE_FRAMEBUFFER\n") && !console.contains("#define CONSOLE_FRAMEBUFFER"));
        let crypto = c.render("crypto.h", "").unwrap();
        assert!(crypto.contains("#define CRYPTO_DIGEST_SHA1\n") && crypto.contains("#undef CRYPTO_DIGEST_MD5\n"));
        // An explicit CONSOLE_SERIAL is what the user asked for: everywhere.
        let c = Config::resolve(&["CONSOLE_SERIAL".into()], &[], d.path()).unwrap();
        assert!(!c.render("console.h", "").unwrap().contains("#if defined"));
    }

    #[test]
    fn the_sources_local_header_is_kept() {
        let d = config_dir();
        let c = Config::resolve(&[], &[], d.path()).unwrap();
        let general = c.render("general.h", "#define SITE_THING 1").unwrap();
        let site = general.find("#define SITE_THING 1\n").unwrap();
        assert!(site < general.find("#define VLAN_CMD").unwrap(), "kiln's settings come last: {general}");
        let local = tempfile::tempdir().unwrap();
        fs::write(local.path().join("console.h"), "#define KEYBOARD_MAP de\n").unwrap();
        let all = c.render_all(local.path()).unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["console.h", "general.h"]);
        assert!(all["console.h"].contains("#define KEYBOARD_MAP de\n"));
    }

    #[test]
    fn bad_options_are_explained() {
        let d = config_dir();
        let err = |o: &[&str], n: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            let n: Vec<String> = n.iter().map(|s| s.to_string()).collect();
            format!("{:#}", Config::resolve(&o, &n, d.path()).unwrap_err())
        };
        let e = err(&["DOWNLOAD_PROTO_HTTP5"], &[]);
        assert!(e.contains("option DOWNLOAD_PROTO_HTTP5 is not defined in any") && e.contains("general.h:"), "{e}");
        assert!(err(&["bad-name"], &[]).contains("is not a C macro name"));
        assert!(err(&["nothere.h:X"], &[]).contains("nothere.h is not a header"));
        assert!(err(&[], &["X=1"]).contains("without a value"));
        assert!(err(&["VLAN_CMD"], &["VLAN_CMD"]).contains("contradict"));
    }

    #[test]
    fn recognises_define_lines() {
        assert!(mentions("  //#define CONSOLE_SERIAL\t/* x */", "CONSOLE_SERIAL"));
        assert!(mentions("# undef  VLAN_CMD", "VLAN_CMD"));
        assert!(!mentions("#define VLAN_CMDS", "VLAN_CMD"));
        assert!(!mentions("#ifdef VLAN_CMD", "VLAN_CMD"));
        assert!(!mentions("/* VLAN_CMD */", "VLAN_CMD"));
    }
}
