//! What a recipe's site is made of, as a whole: every output of the recipe (`kiln push`), what its boot
//! servers serve (`kiln pull`, `[server] pull`), and the closure an air-gapped site needs (`kiln export` /
//! `kiln import`). Bundles are named by their inputs (kiln.toml and kiln.lock), so a bundle fetched from a
//! registry is checked against the hash this recipe gives it; iPXE builds and the appliance are found by
//! their roots where they were built, and by their `-latest` tag where they are fetched (their inputs
//! include the compilers of the machine that built them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::{build_recipe, BuildOptions};
use crate::distribute::{self, closure, latest_tag, Pushed, Remote, Substituters};
use crate::image::RegistryOptions;
use crate::recipe::{LoadedRecipe, UnknownPolicy};
use crate::store::{RootKind, Store};

/// Which outputs of a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every `[image.*]`, every `[ipxe.*]` build and its targets, the appliance ISO.
    Recipe,
    /// What `kiln serve` and the appliance use: the images nodes boot, the appliance's images and the
    /// `[server] ipxe` build.
    Served,
}

/// One output of the site and the root that names it (`image-compute`).
#[derive(Debug, Clone, Serialize)]
pub struct SiteOutput {
    pub root: String,
    pub path: PathBuf,
}

/// The `[image.*]` names the boot server and the appliance use.
pub fn served_images(loaded: &LoadedRecipe) -> Result<Vec<String>> {
    let recipe = &loaded.recipe;
    let mut names: Vec<String> = loaded.nodes()?.into_iter().map(|n| n.image).collect();
    if let Some(UnknownPolicy::Boot(img)) = recipe.server.as_ref().map(|s| &s.unknown) {
        names.push(img.clone());
    }
    if let Some(app) = &recipe.appliance {
        names.push(app.image.clone());
        names.extend(app.images.iter().cloned());
    }
    names.sort();
    names.dedup();
    for n in &names {
        if !recipe.image.contains_key(n) {
            bail!("{}: image {n:?} is used but there is no [image.{n}]", loaded.path.display());
        }
    }
    Ok(names)
}

fn ipxe_names(loaded: &LoadedRecipe, scope: Scope) -> Vec<String> {
    match scope {
        Scope::Recipe => loaded.recipe.ipxe.keys().cloned().collect(),
        Scope::Served => loaded.recipe.server.as_ref().and_then(|s| s.ipxe.clone()).into_iter().collect(),
    }
}

/// The outputs of `loaded` that are in the store, in `scope` (and among `only`, names of `[image.*]` or
/// `[ipxe.*]` tables, when given). An output not built yet is an error saying what to run.
pub fn outputs(store: &Store, loaded: &LoadedRecipe, scope: Scope, only: &[String]) -> Result<Vec<SiteOutput>> {
    let recipe = &loaded.recipe;
    for n in only {
        if !recipe.image.contains_key(n) && !recipe.ipxe.contains_key(n) {
            bail!("{} has no [image.{n}] nor [ipxe.{n}]", loaded.path.display());
        }
    }
    let wanted = |n: &String| only.is_empty() || only.contains(n);
    let images: Vec<String> = match scope {
        Scope::Recipe => recipe.image.keys().cloned().collect(),
        Scope::Served => served_images(loaded)?,
    };
    let images: Vec<String> = images.into_iter().filter(wanted).collect();
    let mut out = Vec::new();
    if !images.is_empty() {
        let opts = BuildOptions { no_build: true, locked: true, ..Default::default() };
        for b in build_recipe(store, loaded, &images, &opts)? {
            out.push(SiteOutput { root: format!("image-{}", b.root()), path: b.path });
        }
    }
    for name in ipxe_names(loaded, scope).into_iter().filter(wanted) {
        let dir = store.root(RootKind::Ipxe, &name).with_context(|| {
            format!("{}: [ipxe.{name}] has not been built here: run `kiln build-ipxe`", loaded.path.display())
        })?;
        if scope == Scope::Recipe {
            out.extend(ipxe_targets(store, &name, &dir)?);
        }
        out.push(SiteOutput { root: format!("ipxe-{name}"), path: dir });
    }
    if let (Scope::Recipe, Some(app), true) = (scope, &recipe.appliance, only.is_empty()) {
        if let Some(dir) = store.root(RootKind::Appliance, &app.image) {
            out.push(SiteOutput { root: format!("appliance-{}", app.image), path: dir });
        }
    }
    Ok(out)
}

/// The per-target outputs an iPXE build gathers (each its own store output).
fn ipxe_targets(store: &Store, build: &str, dir: &Path) -> Result<Vec<SiteOutput>> {
    let manifest: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)
        .with_context(|| format!("{}: not a valid manifest", dir.display()))?;
    let mut out = Vec::new();
    for t in manifest.get("targets").and_then(Value::as_object).into_iter().flat_map(|m| m.values()) {
        let (Some(file), Some(hash)) =
            (t.get("file").and_then(Value::as_str), t.get("input_hash").and_then(Value::as_str))
        else {
            continue;
        };
        let name = format!("{build}-{file}");
        if let Some(path) = store.lookup(hash, &name) {
            out.push(SiteOutput { root: format!("ipxe-{name}"), path });
        }
    }
    Ok(out)
}

/// Pushes the outputs of `loaded` (or of `only`) to `remote`.
pub fn push(
    store: &Store,
    loaded: &LoadedRecipe,
    remote: &Remote,
    only: &[String],
    registry: &RegistryOptions,
) -> Result<Vec<Pushed>> {
    let mut pushed = Vec::new();
    for o in outputs(store, loaded, Scope::Recipe, only)? {
        let p = distribute::push_output(store, &o.path, remote, &[latest_tag(&o.root)], registry)
            .with_context(|| format!("pushing {} to {remote}", o.path.display()))?;
        pushed.push(p);
    }
    Ok(pushed)
}

/// What a pull did for one output.
#[derive(Debug, Serialize)]
pub struct Pulled {
    pub root: String,
    pub path: PathBuf,
    /// `store` when it was already here, else the remote it came from.
    pub from: String,
}

/// Fills the store with the outputs of `loaded` in `scope` from `remote`, building nothing: bundles by the
/// hash this recipe and its lock give them, iPXE builds by their `-latest` tag.
pub fn pull(
    store: &Store,
    loaded: &LoadedRecipe,
    remote: &Remote,
    scope: Scope,
    registry: &RegistryOptions,
) -> Result<Vec<Pulled>> {
    let images: Vec<String> = match scope {
        Scope::Recipe => loaded.recipe.image.keys().cloned().collect(),
        Scope::Served => served_images(loaded)?,
    };
    let mut out = Vec::new();
    if !images.is_empty() {
        let opts = BuildOptions {
            no_build: true,
            substituters: Substituters::new(&[remote.to_string()], registry.clone())?,
            fetch: crate::image::FetchOptions { registry: registry.clone(), arch: None },
            ..Default::default()
        };
        for b in build_recipe(store, loaded, &images, &opts)? {
            let from = b.substituted.clone().unwrap_or_else(|| "store".into());
            out.push(Pulled { root: format!("image-{}", b.root()), path: b.path, from });
        }
    }
    for name in ipxe_names(loaded, scope) {
        let root = format!("ipxe-{name}");
        let (path, _) = distribute::fetch(store, remote, &latest_tag(&root), None, registry)
            .with_context(|| format!("pulling [ipxe.{name}] from {remote}"))?
            .with_context(|| format!("{remote} has no {}: run `kiln push` where it was built", latest_tag(&root)))?;
        store.add_root(RootKind::Ipxe, &name, &path)?;
        out.push(Pulled { root, path, from: remote.to_string() });
    }
    Ok(out)
}

/// `[server] pull`: before `kiln serve` loads its site (and on each reload), fetches what it serves. A
/// registry that cannot be reached is said in one line; the server goes on with what its store holds.
pub fn pull_for_serve(loaded: &LoadedRecipe, store: &Store) {
    let Some(server) = &loaded.recipe.server else { return };
    let Some(url) = &server.pull else { return };
    let registry =
        RegistryOptions { tls_verify: server.pull_tls_verify.unwrap_or(true), authfile: server.pull_authfile.clone() };
    let result = Remote::parse(url).and_then(|remote| pull(store, loaded, &remote, Scope::Served, &registry));
    match result {
        Ok(pulled) => {
            let fetched = pulled.iter().filter(|p| p.from != "store").count();
            println!("kiln serve: pulled from {url}: {fetched} fetched, {} already here", pulled.len() - fetched);
        }
        Err(e) => eprintln!("kiln serve: pulling from {url} failed, serving what the store holds: {e:#}"),
    }
}

/// Writes the closure of what `loaded`'s site serves to `out`: its bundles, its iPXE build, the boot files
/// it names, the recipe and its lock.
pub fn export(store: &Store, loaded: &LoadedRecipe, out: &Path) -> Result<closure::Exported> {
    let roots: BTreeMap<String, PathBuf> =
        outputs(store, loaded, Scope::Served, &[])?.into_iter().map(|o| (o.root, o.path)).collect();
    let mut files = BTreeMap::new();
    files.insert("kiln.toml".to_string(), loaded.path.clone());
    let lock = loaded.lock_path();
    if lock.is_file() {
        files.insert("kiln.lock".to_string(), lock.clone());
    }
    let mut boot_files = serde_json::Map::new();
    if let Some(bf) = loaded.recipe.server.as_ref().and_then(|s| s.boot_files.as_ref()) {
        for (key, path) in [("bios", &bf.bios), ("efi_x64", &bf.efi_x64), ("efi_arm64", &bf.efi_arm64)] {
            if let Some(p) = path {
                let p = loaded.resolve_path(p);
                if !p.is_file() {
                    bail!("{}: [server.boot_files] {key} = {}: no such file", loaded.path.display(), p.display());
                }
                files.insert(format!("boot-{key}"), p);
                boot_files.insert(key.to_string(), json!(format!("boot-{key}")));
            }
        }
    }
    let site = json!({ "schema": 1, "recipe": "kiln.toml", "lock": lock.is_file(), "boot_files": boot_files });
    closure::export(&closure::Closure { roots, files, site }, out)
}

/// What an import did.
#[derive(Debug, Serialize)]
pub struct ImportReport {
    pub outputs: usize,
    /// Outputs the store did not have before.
    pub added: usize,
    pub roots: BTreeMap<String, PathBuf>,
    pub recipe: PathBuf,
}

/// Verifies the closure `archive`, commits it to the store, points the site's roots at it and writes its
/// recipe and lock into `dest` (boot files rewritten to their place in the store). Files already in `dest`
/// are replaced only with `force`.
pub fn import(store: &Store, archive: &Path, dest: &Path, force: bool) -> Result<ImportReport> {
    let recipe_path = dest.join("kiln.toml");
    let lock_path = dest.join("kiln.lock");
    for p in [&recipe_path, &lock_path] {
        if p.exists() && !force {
            bail!("{} exists: import into another directory (--to DIR), or replace it with --force", p.display());
        }
    }
    let imported = closure::import(store, archive)?;
    let recipe_blob = imported.files.get("kiln.toml").context("the closure holds no kiln.toml")?;
    let text = std::fs::read_to_string(recipe_blob).context("the closure's kiln.toml is not text")?;
    let mut doc: toml_edit::DocumentMut = text.parse().context("the closure's kiln.toml")?;
    let mut boot = BTreeMap::new();
    for (key, file) in imported.site.get("boot_files").and_then(Value::as_object).into_iter().flatten() {
        let file = file.as_str().unwrap_or_default();
        let blob = imported.files.get(file).with_context(|| format!("the closure lists {file} but holds none"))?;
        boot.insert(key.clone(), blob.clone());
    }
    if !boot.is_empty() {
        let dir = closure::commit_files(store, "boot-files", &boot)?;
        for key in boot.keys() {
            doc["server"]["boot_files"][key.as_str()] = toml_edit::value(dir.join(key).display().to_string());
        }
    }
    for (root, path) in &imported.roots {
        let (kind, name) =
            RootKind::split(root).with_context(|| format!("the closure names an unknown root {root}"))?;
        store.add_root(kind, name, path)?;
    }
    crate::util::mkdir_p(dest)?;
    crate::util::write_atomic(&recipe_path, doc.to_string().as_bytes())?;
    if let Some(lock) = imported.files.get("kiln.lock") {
        crate::util::write_atomic(&lock_path, &std::fs::read(lock)?)?;
    }
    Ok(ImportReport { outputs: imported.outputs, added: imported.added, roots: imported.roots, recipe: recipe_path })
}
