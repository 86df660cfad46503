//! `flexbridge schema`: the JSON Schemas of the events flexbridge emits.

use anyhow::Context as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// `flexbridge schema` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Directory to write the schema files to.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Prints the schemas, or writes them to `--out`.
pub fn run(Args { out }: Args) -> anyhow::Result<ExitCode> {
    let files = flexbridge_core::schema::v1::SCHEMA_FILES;
    match out {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            for (name, content) in files {
                let path = dir.join(name);
                std::fs::write(&path, content)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("{}", path.display());
            }
        }
        None => {
            let mut all = serde_json::Map::new();
            for (name, content) in files {
                all.insert((*name).to_owned(), serde_json::from_str(content)?);
            }
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
