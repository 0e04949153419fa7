//! `kiln build`: turn a source into a bundle in the store, or answer from the store when the
//! same inputs were built before.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::bundle::{self, BundleSpec, KernelEntry, Manifest, SourceEntry};
use crate::image::{self, FetchOptions, ResolvedImage, Source};
use crate::recipe::{LoadedRecipe, Lock, LockedImage};
use crate::store::{self, RootKind, Store, FORMAT_VERSION};
use crate::util::{FileDigest, Progress};

/// What one build produced.
#[derive(Debug, Serialize)]
pub struct Built {
    pub name: String,
    pub path: PathBuf,
    pub manifest: Manifest,
    /// True when the store already had it and nothing was built.
    #[serde(skip)]
    pub cached: bool,
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub fetch: FetchOptions,
    pub threads: usize,
    /// Overrides the recipe's and the environment's `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: Option<i64>,
    pub locked: bool,
    pub update: bool,
}

/// `SOURCE_DATE_EPOCH` from the environment, if set; a malformed value is an error, not ignored.
pub fn env_source_date_epoch() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => Ok(Some(
            v.trim()
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970"))?,
        )),
        _ => Ok(None),
    }
}

/// Builds one bundle from an already-resolved image.
pub fn build_bundle(
    store: &Store,
    spec: &BundleSpec,
    resolved: ResolvedImage,
    sde: Option<i64>,
    threads: usize,
) -> Result<Built> {
    let mut progress = Progress::new(format!("build {}", spec.name));
    let sde = match sde {
        Some(s) => s,
        None => env_source_date_epoch()?.or(resolved.config.created).unwrap_or(0),
    };
    let arch = image::kernel_arch(&resolved.config.architecture).to_string();
    // Registry images are recorded by digest, local ones by file name: either way a function
    // of the inputs, so the manifest is the same wherever and whenever the bundle is built.
    let reference = resolved.pinned.clone().unwrap_or_else(|| resolved.source.portable_reference());
    let inputs = json!({
        "kind": "bundle",
        "format": FORMAT_VERSION,
        "name": spec.name,
        "source": {
            "transport": resolved.source.transport(),
            "digest": resolved.digest.to_string(),
            "reference": reference,
        },
        "arch": arch,
        "kernel": spec.kernel.as_str(),
        "cmdline": spec.cmdline,
        "compression": spec.compression.name(),
        "level": spec.level,
        "exclude": spec.exclude,
        "source_date_epoch": sde,
        "init_shim": bundle::init_shim_digest().to_string(),
    });
    let hash = store::input_hash(&inputs);
    if let Some(path) = store.lookup(&hash, &spec.name) {
        store.add_root(RootKind::Image, &spec.name, &path)?;
        let manifest = Manifest::read(&path)?;
        return Ok(Built { name: spec.name.clone(), path, manifest, cached: true });
    }
    let exclude = bundle::exclude_set(&spec.exclude)?;
    let pending = store.begin(&spec.name)?;
    let spool = pending.dir().join(".spool");
    crate::util::mkdir_p(&spool)?;
    let source = resolved.source.clone();
    let digest = resolved.digest.clone();
    progress.step(format!("reading {} layer(s) of {source}", resolved.layer_count()));
    let tree = resolved.merged_tree(&spool, threads).with_context(|| format!("reading {source}"))?;
    progress.step("finding the kernel");
    let found = bundle::kernel::find(&tree, &spec.kernel).with_context(|| format!("finding the kernel in {source}"))?;
    let kernel = bundle::write_kernel(&tree, &found, &arch, &pending.dir().join("kernel"))?;
    progress.step(format!(
        "writing image ({} entries, {} level {})",
        tree.nodes.len(),
        spec.compression.name(),
        spec.level
    ));
    let image_info = bundle::write_image(
        &tree,
        &exclude,
        sde,
        spec.compression,
        spec.level,
        threads,
        &pending.dir().join("image"),
        "image",
    )?;
    let initramfs = bundle::write_initramfs(sde, spec.compression, spec.level, &pending.dir().join("initramfs"))?;
    let has_modules = ["lib/modules/", "usr/lib/modules/"]
        .iter()
        .any(|d| tree.nodes.contains_key(format!("{d}{}", found.version).as_bytes()));
    drop(tree);
    std::fs::remove_dir_all(&spool).with_context(|| format!("removing {}", spool.display()))?;
    let entry = |sha256: &str, size: u64| FileDigest { sha256: sha256.to_string(), size };
    let files = [
        (bundle::manifest::KERNEL.to_string(), kernel.clone()),
        (bundle::manifest::INITRAMFS.to_string(), entry(&initramfs.sha256, initramfs.size)),
        (bundle::manifest::IMAGE.to_string(), entry(&image_info.sha256, image_info.size)),
    ];
    let manifest = Manifest {
        schema: bundle::manifest::SCHEMA,
        kind: "bundle".to_string(),
        name: spec.name.clone(),
        arch,
        kernel: KernelEntry {
            file: bundle::manifest::KERNEL.to_string(),
            path: format!("/{}", String::from_utf8_lossy(&found.path)),
            version: found.version.clone(),
            sha256: kernel.sha256.clone(),
            size: kernel.size,
            modules: has_modules,
        },
        initrds: vec![initramfs, image_info],
        cmdline: spec.cmdline.clone(),
        source: SourceEntry { reference, transport: source.transport().to_string(), digest: digest.to_string() },
        recipe_hash: hash.clone(),
        source_date_epoch: sde,
        format: FORMAT_VERSION,
        files: files.into_iter().collect(),
    };
    store::write_manifest(pending.dir(), &manifest)?;
    progress.step("committing to the store");
    let path = store.commit(pending, &hash, &spec.name)?;
    store.add_root(RootKind::Image, &spec.name, &path)?;
    progress.done(path.display());
    Ok(Built { name: spec.name.clone(), path, manifest, cached: false })
}

/// Builds `--from SOURCE --name NAME`, outside any recipe.
pub fn build_from(store: &Store, source: &Source, spec: &BundleSpec, opts: &BuildOptions) -> Result<Built> {
    let resolved = image::resolve(source, &opts.fetch).with_context(|| format!("resolving {source}"))?;
    build_bundle(store, spec, resolved, opts.source_date_epoch, opts.threads)
}

/// Builds every `[image.*]` of a recipe (or only `only`), pinning registry tags in kiln.lock.
pub fn build_recipe(store: &Store, loaded: &LoadedRecipe, only: &[String], opts: &BuildOptions) -> Result<Vec<Built>> {
    let recipe = &loaded.recipe;
    for name in only {
        if !recipe.image.contains_key(name) {
            let known: Vec<&str> = recipe.image.keys().map(String::as_str).collect();
            bail!("{} has no [image.{name}] (it has: {})", loaded.path.display(), known.join(", "));
        }
    }
    if recipe.image.is_empty() {
        bail!("{} declares no [image.NAME] tables: nothing to build", loaded.path.display());
    }
    let specs = BundleSpec::all(loaded)?;
    let lock_path = loaded.lock_path();
    let mut lock = Lock::load(&lock_path)?;
    let before = toml::to_string(&lock).unwrap_or_default();
    let sde = opts.source_date_epoch.or(recipe.source_date_epoch);
    let mut out = Vec::new();
    for (name, img) in &recipe.image {
        if !only.is_empty() && !only.contains(name) {
            continue;
        }
        let ctx = || format!("{}: [image.{name}]", loaded.path.display());
        let spec = &specs[name];
        let mut source = Source::parse(&img.from).with_context(ctx)?.relative_to(loaded.base_dir());
        let mut fetch = opts.fetch.clone();
        if img.arch.is_some() {
            fetch.arch = img.arch.clone();
        }
        if let Source::Docker(reference) = &source {
            let pinned_by_digest = reference.contains("@sha256:");
            match lock.image.get(name) {
                Some(l) if l.from == img.from && !opts.update => {
                    let pinned = l.pinned.strip_prefix("docker://").unwrap_or(&l.pinned).to_string();
                    source = Source::Docker(pinned);
                }
                _ if opts.locked && !pinned_by_digest => bail!(
                    "{}: {} has no pin for [image.{name}] ({}) and --locked forbids resolving it; \
                     run `kiln build --update` to pin it",
                    loaded.path.display(),
                    lock_path.display(),
                    img.from
                ),
                _ => {}
            }
        }
        let resolved = image::resolve(&source, &fetch).with_context(|| format!("{}: resolving {}", ctx(), img.from))?;
        if let Some(pinned) = &resolved.pinned {
            lock.image.insert(name.clone(), LockedImage { from: img.from.clone(), pinned: pinned.clone() });
        }
        let built = build_bundle(store, spec, resolved, sde, opts.threads).with_context(ctx)?;
        out.push(built);
    }
    if toml::to_string(&lock).unwrap_or_default() != before {
        lock.save(&lock_path)?;
    }
    Ok(out)
}
