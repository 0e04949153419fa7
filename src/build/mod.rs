//! `kiln build`: turn a source into a bundle in the store, or answer from the store when the
//! same inputs were built before, or from a substituter (a registry that has the output).
//!
//! A bundle's store hash is a function of its `[image.NAME]` and of the image's identity (digest,
//! architecture, creation time). kiln.lock records that identity, so the hash is known without reading
//! the source: a pinned registry image is not asked again, and a local source that is absent (an
//! imported store, a replica) is taken from the lock. [`site`] is what a recipe's site serves: pushed,
//! pulled, exported and imported whole.

pub mod site;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::bundle::{self, two_stage, BundleSpec, KernelEntry, Manifest, SourceEntry};
use crate::distribute::Substituters;
use crate::image::{self, FetchOptions, ResolvedImage, Source};
use crate::recipe::{BootMode, LoadedRecipe, Lock, LockedImage};
use crate::store::{self, RootKind, Store, FORMAT_VERSION};
use crate::util::{ByteProgress, FileDigest, Progress};

/// What one build produced.
#[derive(Debug, Serialize)]
pub struct Built {
    pub name: String,
    pub path: PathBuf,
    pub manifest: Manifest,
    /// True when the store already had it and nothing was built.
    #[serde(skip)]
    pub cached: bool,
    /// The substituter it was fetched from instead of being built.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub substituted: Option<String>,
}

impl Built {
    /// The name of its root in the store (`image-` + this): the image's name for an initrd bundle,
    /// `NAME.two-stage` for a two-stage one.
    pub fn root(&self) -> String {
        two_stage::root_name(&self.name, self.manifest.boot)
    }
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub fetch: FetchOptions,
    pub threads: usize,
    /// Overrides the recipe's and the environment's `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: Option<i64>,
    pub locked: bool,
    pub update: bool,
    /// Asked for each output the store does not have, before building it.
    pub substituters: Substituters,
    /// Build nothing: an output neither the store nor a substituter has is an error (`kiln pull`).
    pub no_build: bool,
}

/// What identifies a source image for the store hash: enough to name the bundle without reading a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub transport: String,
    /// By digest for registry images, by file name for local ones.
    pub reference: String,
    pub digest: String,
    /// OCI architecture name (`amd64`).
    pub arch: String,
    pub created: Option<i64>,
}

impl Identity {
    pub fn of(resolved: &ResolvedImage) -> Identity {
        Identity {
            transport: resolved.source.transport().to_string(),
            // Registry images are recorded by digest, local ones by file name: either way a function
            // of the inputs, so the manifest is the same wherever and whenever the bundle is built.
            reference: resolved.pinned.clone().unwrap_or_else(|| resolved.source.portable_reference()),
            digest: resolved.digest.to_string(),
            arch: resolved.config.architecture.clone(),
            created: resolved.config.created,
        }
    }

    /// The identity kiln.lock recorded for `source`, if it recorded one.
    fn from_lock(locked: &LockedImage, source: &Source) -> Option<Identity> {
        let reference = match source {
            Source::Docker(_) => locked.pinned.clone()?,
            other => other.portable_reference(),
        };
        Some(Identity {
            transport: source.transport().to_string(),
            reference,
            digest: locked.digest.clone()?,
            arch: locked.arch.clone()?,
            created: locked.created,
        })
    }
}

/// A bundle's inputs, named: its store hash before anything is read.
struct Plan {
    hash: String,
    sde: i64,
    arch: String,
    /// The recipe's command line, else the default for the architecture.
    cmdline: String,
    /// two-stage: the kiln-node the loader is (checked for the architecture).
    loader: Option<PathBuf>,
}

fn plan(spec: &BundleSpec, id: &Identity, sde: Option<i64>) -> Result<Plan> {
    let sde = match sde {
        Some(s) => s,
        None => env_source_date_epoch()?.or(id.created).unwrap_or(0),
    };
    let arch = image::kernel_arch(&id.arch).to_string();
    let cmdline = spec.cmdline.clone().unwrap_or_else(|| bundle::default_cmdline(&arch).to_string());
    let loader = if spec.boot == BootMode::TwoStage {
        let loader = crate::util::node_binary()?;
        two_stage::check_loader_arch(&loader, &arch)?;
        Some(loader)
    } else {
        None
    };
    let mut inputs = json!({
        "kind": "bundle",
        "format": FORMAT_VERSION,
        "name": spec.name,
        "source": {
            "transport": id.transport,
            "digest": id.digest,
            "reference": id.reference,
        },
        "arch": arch,
        "kernel": spec.kernel.as_str(),
        "cmdline": cmdline,
        "compression": spec.compression.name(),
        "level": spec.level,
        "exclude": spec.exclude,
        "source_date_epoch": sde,
        "init_shim": bundle::init_shim_digest().to_string(),
    });
    if let Some(loader) = &loader {
        // A new loader rebuilds two-stage bundles; initrd bundles keep the inputs they always had.
        let digest = FileDigest::of_file(loader)?;
        inputs["boot"] = json!(spec.boot.to_string());
        inputs["two_stage"] = json!({
            "format": two_stage::TWO_STAGE_FORMAT,
            "image_format": two_stage::IMAGE_FORMAT,
            "loader": digest.sha256,
        });
    }
    Ok(Plan { hash: store::input_hash(&inputs), sde, arch, cmdline, loader })
}

/// The output for `plan` from the store or, failing that, from a substituter (verified against the hash).
fn found(store: &Store, spec: &BundleSpec, plan: &Plan, subs: &Substituters) -> Result<Option<Built>> {
    let name = &spec.name;
    let root = two_stage::root_name(name, spec.boot);
    if let Some(path) = store.lookup(&plan.hash, name) {
        store.add_root(RootKind::Image, &root, &path)?;
        let manifest = Manifest::read(&path)?;
        return Ok(Some(Built { name: name.clone(), path, manifest, cached: true, substituted: None }));
    }
    let Some(got) = subs.fetch(store, &plan.hash, name) else { return Ok(None) };
    let manifest = Manifest::read(&got.path)?;
    if manifest.recipe_hash != plan.hash || manifest.name != *name {
        bail!("internal: {} was committed under another name or hash", got.path.display());
    }
    store.add_root(RootKind::Image, &root, &got.path)?;
    crate::util::say(format!(
        "kiln: [image.{name}] substituted from {} ({}), not built",
        got.from,
        crate::util::human_size(got.size)
    ));
    Ok(Some(Built { name: name.clone(), path: got.path, manifest, cached: false, substituted: Some(got.from) }))
}

/// Whether a local source's file or directory is missing (registry sources are never "missing" here).
fn local_source_absent(source: &Source) -> bool {
    let path: &Path = match source {
        Source::Docker(_) => return false,
        Source::Oci { dir, .. } => dir,
        Source::OciArchive(p) | Source::DockerArchive(p) | Source::Dir(p) | Source::Tar(p) => p,
    };
    !path.exists()
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
    let id = Identity::of(&resolved);
    let plan = plan(spec, &id, sde)?;
    if let Some(b) = found(store, spec, &plan, &Substituters::default())? {
        return Ok(b);
    }
    build_planned(store, spec, resolved, &plan, threads)
}

fn build_planned(
    store: &Store,
    spec: &BundleSpec,
    mut resolved: ResolvedImage,
    plan: &Plan,
    threads: usize,
) -> Result<Built> {
    let mut progress = Progress::new(format!("build {}", spec.name));
    let (hash, sde, arch) = (plan.hash.clone(), plan.sde, plan.arch.clone());
    let reference = Identity::of(&resolved).reference;
    let exclude = bundle::exclude_set(&spec.exclude)?;
    let pending = store.begin(&spec.name)?;
    let spool = pending.dir().join(".spool");
    crate::util::mkdir_p(&spool)?;
    let source = resolved.source.clone();
    let digest = resolved.digest.clone();
    if resolved.is_remote() {
        progress.step(format!("pulling {} layer(s) of {source}", resolved.layer_count()));
        resolved.pull(&spool, &progress.bytes()).with_context(|| format!("pulling {source}"))?;
    }
    let image_path = pending.dir().join("image");
    let initramfs_path = pending.dir().join("initramfs");
    let (tree, image) =
        write_image(&mut progress, spec, resolved, &source, &exclude, sde, threads, &spool, &image_path)
            .with_context(|| format!("reading {source}"))?;
    progress.step("finding the kernel");
    let found = bundle::kernel::find(&tree, &spec.kernel).with_context(|| format!("finding the kernel in {source}"))?;
    let kernel = bundle::write_kernel(&tree, &found, &arch, &pending.dir().join("kernel"))?;
    let (initrds, image_file, image_entry, loader_entry) = match (image, &plan.loader) {
        (WrittenImage::Squashfs(image), Some(loader)) => {
            two_stage::check_kernel_config(&tree, &found, spec.compression)?;
            progress.step("writing the loader's initramfs (kiln-node and kernel modules)");
            let (initramfs, loader) =
                two_stage::write_initramfs(&tree, &found, loader, sde, spec.compression, spec.level, &initramfs_path)?;
            let file = FileDigest { sha256: image.sha256.clone(), size: image.size };
            (vec![initramfs], file, Some(image), Some(loader))
        }
        (WrittenImage::Cpio(image_info), _) => {
            let initramfs = bundle::write_initramfs(sde, spec.compression, spec.level, &initramfs_path)?;
            let file = FileDigest { sha256: image_info.sha256.clone(), size: image_info.size };
            (vec![initramfs, image_info], file, None, None)
        }
        (WrittenImage::Squashfs(_), None) => bail!("internal: a squashfs image without a loader"),
    };
    let has_modules = ["lib/modules/", "usr/lib/modules/"]
        .iter()
        .any(|d| tree.nodes.contains_key(format!("{d}{}", found.version).as_bytes()));
    drop(tree);
    std::fs::remove_dir_all(&spool).with_context(|| format!("removing {}", spool.display()))?;
    let entry = |sha256: &str, size: u64| FileDigest { sha256: sha256.to_string(), size };
    let files = [
        (bundle::manifest::KERNEL.to_string(), kernel.clone()),
        (bundle::manifest::INITRAMFS.to_string(), entry(&initrds[0].sha256, initrds[0].size)),
        (bundle::manifest::IMAGE.to_string(), image_file),
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
        initrds,
        boot: spec.boot,
        image: image_entry,
        loader: loader_entry,
        cmdline: plan.cmdline.clone(),
        source: SourceEntry { reference, transport: source.transport().to_string(), digest: digest.to_string() },
        recipe_hash: hash.clone(),
        source_date_epoch: sde,
        format: FORMAT_VERSION,
        files: files.into_iter().collect(),
    };
    store::write_manifest(pending.dir(), &manifest)?;
    progress.step("committing to the store");
    let path = store.commit(pending, &hash, &spec.name)?;
    store.add_root(RootKind::Image, &two_stage::root_name(&spec.name, spec.boot), &path)?;
    progress.done(path.display());
    Ok(Built { name: spec.name.clone(), path, manifest, cached: false, substituted: None })
}

/// The bundle's `image`, as its boot path wants it.
enum WrittenImage {
    Cpio(bundle::ArchiveInfo),
    Squashfs(two_stage::ImageEntry),
}

/// Files the build reads again after the image is written (the kernel; for two-stage, modules and firmware):
/// a streamed layer keeps their bytes.
fn read_again(path: &[u8], spec: &BundleSpec) -> bool {
    if path.starts_with(b"boot/") {
        return true;
    }
    if let bundle::KernelSpec::Path(p) = &spec.kernel {
        if path == p.trim_start_matches('/').as_bytes() {
            return true;
        }
    }
    let modules = path.starts_with(b"lib/modules/") || path.starts_with(b"usr/lib/modules/");
    if spec.boot == BootMode::Initrd {
        return modules && path.ends_with(b"/vmlinuz");
    }
    modules || path.starts_with(b"lib/firmware/") || path.starts_with(b"usr/lib/firmware/")
}

/// Reads the image and writes the bundle's `image`: while its one layer is read when it has one
/// ([`bundle::streamed`]), else from the merged tree of all its layers.
#[allow(clippy::too_many_arguments)]
fn write_image(
    progress: &mut Progress,
    spec: &BundleSpec,
    resolved: ResolvedImage,
    source: &impl std::fmt::Display,
    exclude: &globset::GlobSet,
    sde: i64,
    threads: usize,
    spool: &std::path::Path,
    out: &std::path::Path,
) -> Result<(crate::image::tree::Tree, WrittenImage)> {
    let two_stage = spec.boot == BootMode::TwoStage;
    let settings = bundle::ImageSettings { exclude, sde, compression: spec.compression, level: spec.level, threads };
    let what = if two_stage { "squashfs, " } else { "" };
    let layers = resolved.layer_count();
    let keep = |p: &[u8]| read_again(p, spec);
    // KILN_NO_STREAM=1 reads every image whole (the bytes are the same either way; tests compare them).
    if layers == 1 && std::env::var_os("KILN_NO_STREAM").is_none() {
        progress.step(format!(
            "streaming the layer of {source} into the image ({what}{} level {})",
            spec.compression.name(),
            spec.level
        ));
        // Each step counts its own bytes: a counter taken before a step would report to the one before.
        let bytes: ByteProgress = progress.bytes();
        let streamed = if two_stage {
            let mut sink = two_stage::SquashfsStream::new(out, settings)?;
            match resolved.stream(spool, &keep, &bytes, &mut |t, p, d| sink.entry(t, p, d)) {
                Some(Ok(tree)) => {
                    let image = sink.finish(&tree, out, "image")?;
                    Some(Ok((tree, WrittenImage::Squashfs(image))))
                }
                other => other.map(|r| r.map(|_| unreachable!("handled above"))),
            }
        } else {
            let mut sink = bundle::streamed::CpioStream::new(out, settings)?;
            match resolved.stream(spool, &keep, &bytes, &mut |t, p, d| sink.entry(t, p, d)) {
                Some(Ok(tree)) => {
                    let image = sink.finish(out, "image", spec.compression, spec.level)?;
                    Some(Ok((tree, WrittenImage::Cpio(image))))
                }
                other => other.map(|r| r.map(|_| unreachable!("handled above"))),
            }
        };
        match streamed {
            Some(Ok(done)) => return Ok(done),
            Some(Err(e)) if e.downcast_ref::<bundle::streamed::StreamAbort>().is_some() => {
                progress.step(format!("{e}; reading it whole"));
            }
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    progress.step(format!("reading {layers} layer(s) of {source}"));
    let tree = resolved.merged_tree(spool, threads, &progress.bytes())?;
    progress.step(format!(
        "writing image ({} entries, {what}{} level {})",
        tree.nodes.len(),
        spec.compression.name(),
        spec.level
    ));
    let bytes = progress.bytes();
    let image = if two_stage {
        WrittenImage::Squashfs(two_stage::write_image(&tree, &settings, out, "image")?)
    } else {
        WrittenImage::Cpio(bundle::write_image(&tree, &settings, out, "image", &bytes)?)
    };
    Ok((tree, image))
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
    // Nodes may boot an image another way than the image says; without nodes there is nothing to ask.
    let nodes = if recipe.node.is_empty() { Vec::new() } else { loaded.nodes()? };
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
        // The architecture this image is built for: a pin made for another is stale.
        let arch = match &fetch.arch {
            Some(a) => image::oci_arch(a).with_context(|| format!("{}: field `arch`", ctx()))?,
            None => image::host_oci_arch(),
        };
        let locked = lock
            .image
            .get(name)
            .filter(|l| l.from == img.from && l.arch.as_deref().unwrap_or(image::host_oci_arch()) == arch)
            .cloned();
        if let Source::Docker(reference) = &source {
            let pinned_by_digest = reference.contains("@sha256:");
            match locked.as_ref().and_then(|l| l.pinned.as_ref()) {
                Some(pinned) if !opts.update => {
                    source = Source::Docker(pinned.strip_prefix("docker://").unwrap_or(pinned).to_string());
                }
                _ if opts.locked && !pinned_by_digest => bail!(
                    "{}: {} has no pin for [image.{name}] ({}, {arch}) and --locked forbids resolving it; \
                     run `kiln build --update` to pin it",
                    loaded.path.display(),
                    lock_path.display(),
                    img.from
                ),
                _ => {}
            }
        }
        // A pinned registry image is immutable, so its recorded identity stands; a local source is
        // read again when it is here (it may have changed) and taken from the lock when it is not.
        let recorded = locked.as_ref().and_then(|l| Identity::from_lock(l, &source));
        let mut resolved = None;
        let id = match recorded {
            Some(id) if !opts.update && (matches!(source, Source::Docker(_)) || local_source_absent(&source)) => id,
            _ => {
                let r = image::resolve(&source, &fetch).with_context(|| {
                    let hint = if local_source_absent(&source) {
                        format!(
                            " ({} records no identity for it: build where the source is, then copy kiln.lock)",
                            lock_path.display()
                        )
                    } else {
                        String::new()
                    };
                    format!("{}: resolving {}{hint}", ctx(), img.from)
                })?;
                let id = Identity::of(&r);
                resolved = Some(r);
                id
            }
        };
        lock.image.insert(
            name.clone(),
            LockedImage {
                from: img.from.clone(),
                pinned: matches!(source, Source::Docker(_)).then(|| id.reference.clone()),
                digest: Some(id.digest.clone()),
                arch: Some(id.arch.clone()),
                created: id.created,
            },
        );
        // Each way its nodes boot it: the image's own, and any other a node or profile asks for.
        let mut modes = vec![spec.boot];
        for n in nodes.iter().filter(|n| &n.image == name) {
            if let Some(b) = n.boot.filter(|b| !modes.contains(b)) {
                modes.push(b);
            }
        }
        for boot in modes {
            let spec = &BundleSpec { boot, ..spec.clone() };
            let plan = plan(spec, &id, sde).with_context(ctx)?;
            if let Some(b) = found(store, spec, &plan, &opts.substituters).with_context(ctx)? {
                out.push(b);
                continue;
            }
            if opts.no_build {
                bail!(
                    "{}: the bundle ({}) is neither in the store nor in a substituter; push it from where it was \
                     built (kiln push), or build it here (kiln build)",
                    ctx(),
                    store.path_for(&plan.hash, name).display()
                );
            }
            // A second boot mode reads the image again.
            let resolved = match resolved.take() {
                Some(r) => r,
                None => {
                    image::resolve(&source, &fetch).with_context(|| format!("{}: resolving {}", ctx(), img.from))?
                }
            };
            if Identity::of(&resolved) != id {
                bail!(
                    "{}: {} is not the image {} records (digest {}); run `kiln build --update` to pin it again",
                    ctx(),
                    img.from,
                    lock_path.display(),
                    id.digest
                );
            }
            let built = build_planned(store, spec, resolved, &plan, opts.threads).with_context(ctx)?;
            out.push(built);
        }
    }
    if toml::to_string(&lock).unwrap_or_default() != before {
        lock.save(&lock_path)?;
    }
    Ok(out)
}
