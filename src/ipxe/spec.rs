//! What one iPXE build is: its name, targets, source, embedded script and options, checked.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::embed::{self, EmbedScript};
use super::source::SourceSpec;
use super::target::Target;
use crate::recipe::check_name;

/// Where a build was described, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cli,
    Recipe,
}

impl Origin {
    fn field(self, recipe_key: &str, flag: &str) -> String {
        match self {
            Origin::Cli => flag.to_string(),
            Origin::Recipe => format!("field `{recipe_key}`"),
        }
    }
}

/// One iPXE build: what to build from what.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub name: String,
    pub targets: Vec<Target>,
    pub source: SourceSpec,
    pub embed: Option<EmbedScript>,
    pub options: Vec<String>,
    pub no_options: Vec<String>,
    pub source_date_epoch: Option<i64>,
}

impl BuildSpec {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        origin: Origin,
        name: &str,
        targets: &[String],
        source: SourceSpec,
        embed: Option<&Path>,
        vlan: Option<u16>,
        chain: Option<&str>,
        options: Vec<String>,
        no_options: Vec<String>,
        source_date_epoch: Option<i64>,
    ) -> Result<BuildSpec> {
        check_name(name).with_context(|| origin.field("name", "--name"))?;
        if targets.is_empty() {
            bail!("{}: name at least one target", origin.field("targets", "--target"));
        }
        let mut parsed = Vec::new();
        for t in targets {
            let t = Target::parse(t).with_context(|| origin.field("targets", "--target"))?;
            if !parsed.contains(&t) {
                parsed.push(t);
            }
        }
        let embed = match (embed, vlan, chain) {
            (Some(_), Some(_), _) => {
                bail!("{} and {} exclude each other", origin.field("embed", "--embed"), origin.field("vlan", "--vlan"))
            }
            (Some(_), _, Some(_)) => {
                bail!(
                    "{} and {} exclude each other",
                    origin.field("embed", "--embed"),
                    origin.field("chain", "--chain")
                )
            }
            (Some(file), None, None) => Some(embed::from_file(file).with_context(|| origin.field("embed", "--embed"))?),
            (None, vlan, chain) => {
                let what =
                    if vlan.is_some() { origin.field("vlan", "--vlan") } else { origin.field("chain", "--chain") };
                embed::generate(vlan, chain).with_context(|| what)?
            }
        };
        Ok(BuildSpec { name: name.to_string(), targets: parsed, source, embed, options, no_options, source_date_epoch })
    }
}
