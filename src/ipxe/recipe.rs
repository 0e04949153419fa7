//! `[ipxe.NAME]` tables of kiln.toml: each parsed into a [`BuildSpec`], and built with its git revision
//! pinned in kiln.lock.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::build::{build, BuildOptions, BuildReport};
use super::source::{SourceSpec, UPSTREAM_GIT};
use super::spec::{BuildSpec, Origin};
use crate::recipe::{IpxeSourceRecipe, LoadedRecipe, Lock, LockedIpxe};

/// The build `[ipxe.NAME]` of `loaded` describes. Errors name the file, the table and the field.
pub fn spec(loaded: &LoadedRecipe, name: &str) -> Result<BuildSpec> {
    let at = || format!("{}: [ipxe.{name}]", loaded.path.display());
    let r = loaded.ipxe(name)?;
    let rel = |p: &PathBuf| loaded.resolve_path(p);
    let source = match r.source {
        None => SourceSpec::upstream(),
        Some(IpxeSourceRecipe { path: Some(p), git: None, rev: None }) => SourceSpec::Path(rel(&p)),
        Some(IpxeSourceRecipe { path: Some(_), .. }) => {
            bail!("{}: field `source`: give either path or git (with rev), not both", at())
        }
        Some(IpxeSourceRecipe { git, rev, path: None }) => {
            let url = git.unwrap_or_else(|| UPSTREAM_GIT.into());
            let rev = rev.unwrap_or_else(|| "HEAD".into());
            SourceSpec::Git { url, rev }
        }
    };
    let targets = r.targets.unwrap_or_else(|| super::target::DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect());
    BuildSpec::new(
        Origin::Recipe,
        name,
        &targets,
        source,
        r.embed.as_ref().map(rel).as_deref(),
        r.vlan,
        r.chain.as_deref(),
        r.options,
        r.no_options,
        loaded.recipe.source_date_epoch,
    )
    .with_context(at)
}

/// Builds the `[ipxe.NAME]` tables `names` of `loaded`, pinning git revisions in kiln.lock (`update`: resolve
/// them again). `source_date_epoch` overrides the recipe's.
pub fn build_recipe(
    store: &crate::store::Store,
    loaded: &LoadedRecipe,
    names: &[String],
    opts: &BuildOptions,
    source_date_epoch: Option<i64>,
    update: bool,
) -> Result<Vec<BuildReport>> {
    let mut reports = Vec::new();
    let lock_path = loaded.lock_path();
    let mut lock = Lock::load(&lock_path)?;
    let before = toml::to_string(&lock).unwrap_or_default();
    for name in names {
        let mut spec = spec(loaded, name)?;
        if source_date_epoch.is_some() {
            spec.source_date_epoch = source_date_epoch;
        }
        let pinned = match &spec.source {
            SourceSpec::Git { url, rev } if !update => {
                lock.ipxe.get(name).filter(|l| &l.git == url && &l.rev == rev).map(|l| l.commit.clone())
            }
            _ => None,
        };
        let report = build(store, &spec, opts, pinned.as_deref())
            .with_context(|| format!("building [ipxe.{name}] of {}", loaded.path.display()))?;
        if let (SourceSpec::Git { url, rev }, Some(commit)) = (&spec.source, &report.source.commit) {
            lock.ipxe.insert(name.clone(), LockedIpxe { git: url.clone(), rev: rev.clone(), commit: commit.clone() });
        }
        reports.push(report);
    }
    if !opts.dry_run && toml::to_string(&lock).unwrap_or_default() != before {
        lock.save(&lock_path)?;
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (tempfile::TempDir, LoadedRecipe) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kiln.toml");
        std::fs::write(&p, text).unwrap();
        let loaded = LoadedRecipe::load(&p).unwrap();
        (d, loaded)
    }

    #[test]
    fn parses_the_design_example() {
        let (d, loaded) = load(
            r#"
[ipxe.site]
targets = ["bin-x86_64-efi/snponly.efi", "bin-x86_64-pcbios/undionly.kpxe", "bin-arm64-efi/snponly.efi"]
vlan = 1000
options = ["DOWNLOAD_PROTO_HTTPS"]
source = { path = "../ipxe" }
"#,
        );
        let s = spec(&loaded, "site").unwrap();
        assert_eq!(s.targets.len(), 3);
        assert_eq!(s.source, SourceSpec::Path(d.path().join("../ipxe")));
        assert!(String::from_utf8_lossy(&s.embed.unwrap().text).contains("vcreate --tag 1000 net0"));
        assert_eq!(s.options, ["DOWNLOAD_PROTO_HTTPS"]);
    }

    #[test]
    fn defaults_to_pinned_upstream() {
        let (_d, loaded) = load("[ipxe.plain]\n");
        let s = spec(&loaded, "plain").unwrap();
        assert_eq!(s.source, SourceSpec::upstream());
        assert_eq!(s.targets.len(), 3);
        assert!(s.embed.is_none());
        let (_d, loaded) = load("[ipxe.g]\nsource = { git = \"https://example.org/ipxe\" }\n");
        assert_eq!(
            spec(&loaded, "g").unwrap().source,
            SourceSpec::Git { url: "https://example.org/ipxe".into(), rev: "HEAD".into() }
        );
    }

    #[test]
    fn errors_name_file_table_and_field() {
        let (_d, loaded) = load("[ipxe.site]\nvlna = 1000\n");
        let e = format!("{:#}", spec(&loaded, "site").unwrap_err());
        assert!(e.contains("kiln.toml: [ipxe.site]") && e.contains("unknown field `vlna`"), "{e}");
        let (_d, loaded) = load("[ipxe.site]\nvlan = 5000\n");
        let e = format!("{:#}", spec(&loaded, "site").unwrap_err());
        assert!(e.contains("[ipxe.site]") && e.contains("field `vlan`") && e.contains("out of range"), "{e}");
        let (_d, loaded) = load("[ipxe.site]\nsource = { path = \"a\", git = \"b\" }\n");
        assert!(format!("{:#}", spec(&loaded, "site").unwrap_err()).contains("field `source`"));
        let (_d, loaded) = load("[ipxe.site]\nsource = { url = \"b\" }\n");
        assert!(format!("{:#}", spec(&loaded, "site").unwrap_err()).contains("unknown field `url`"));
        let (_d, loaded) = load("[ipxe.site]\ntargets = [\"ipxe.efi\"]\n");
        let e = format!("{:#}", spec(&loaded, "site").unwrap_err());
        assert!(e.contains("field `targets`") && e.contains("must name a build directory"), "{e}");
        let (_d, loaded) = load("[ipxe.site]\nvlan = 10\nembed = \"x.ipxe\"\n");
        assert!(format!("{:#}", spec(&loaded, "site").unwrap_err())
            .contains("field `embed` and field `vlan` exclude each other"));
    }
}
