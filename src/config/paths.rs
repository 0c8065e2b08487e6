//! Paths in a config file are relative to the file's folder, so that a file names the same
//! folders from whatever working directory dlpipe starts in (a release unpacked anywhere, a
//! container, a service manager). Paths that are not in a file keep the working directory as
//! their base: the built-in defaults (`models`, `out/snapshots`, `.cache/features`, for a run
//! from a clone) and `DLPIPE__*` variables, which, like command-line flags, are set by whoever
//! starts the process, where a relative path means the working directory.

use super::ConfigError;
use std::path::Path;

/// The keys that hold paths, as key paths of the configuration's TOML table. `model.name` is a
/// path only where it names a file (`.json`, `.pt`, `.ts`); otherwise it is a name in `model.dir`.
pub const PATH_KEYS: [&[&str]; 6] = [
    &["model", "dir"],
    &["model", "name"],
    &["pipeline", "snapshot_dir"],
    &["train", "feature_cache"],
    &["fetch", "file_root"],
    &["fetch", "file_roots"],
];

/// Rewrites every relative path that `table` (a config file's own table) sets as one under
/// `base`, the file's folder. Empty strings ("none") and absolute paths stay as they are.
pub(super) fn resolve_against(table: &mut toml::Table, base: &Path) -> Result<(), ConfigError> {
    for key in PATH_KEYS {
        let Some(value) = lookup_mut(table, key) else { continue };
        let name = key.join(".");
        match value {
            // A model name that is not a file is a name in model.dir.
            toml::Value::String(path) if key != ["model", "name"] || names_a_file(path) => {
                *path = joined(base, path, &name)?;
            }
            toml::Value::Array(paths) => {
                for path in paths.iter_mut().filter_map(|p| match p {
                    toml::Value::String(path) => Some(path),
                    _ => None,
                }) {
                    *path = joined(base, path, &name)?;
                }
            }
            // A value of the wrong type: deserializing the table reports it, naming the key.
            _ => {}
        }
    }
    Ok(())
}

/// Whether `model.name` names a manifest or model file rather than a model in `model.dir`
/// (the rule of [`crate::model::resolve`]).
fn names_a_file(name: &str) -> bool {
    matches!(Path::new(name).extension().and_then(|e| e.to_str()), Some("json" | "pt" | "ts"))
}

/// `path` under `base` where it is relative and not empty.
fn joined(base: &Path, path: &str, key: &str) -> Result<String, ConfigError> {
    if path.is_empty() || Path::new(path).is_absolute() {
        return Ok(path.to_owned());
    }
    let full = base.join(path);
    full.to_str().map(str::to_owned).ok_or_else(|| {
        ConfigError::Value(format!("{key}: {} is not UTF-8, so it cannot be a config value", full.display()))
    })
}

fn lookup_mut<'a>(table: &'a mut toml::Table, path: &[&str]) -> Option<&'a mut toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut here = table;
    for key in parents {
        here = here.get_mut(*key)?.as_table_mut()?;
    }
    here.get_mut(*last)
}

/// The folder a config file's relative paths are relative to: the folder of `file` as named
/// (not with links resolved: a mounted `/etc/dlpipe/dlpipe.toml` that links into a
/// Kubernetes `..data` folder still means `/etc/dlpipe`), made absolute once, so the paths stay
/// right whatever the process does with its working directory later.
pub(super) fn base_of(file: &Path) -> Result<std::path::PathBuf, ConfigError> {
    let absolute = std::path::absolute(file).map_err(|source| ConfigError::Read { path: file.into(), source })?;
    Ok(absolute.parent().map(Path::to_path_buf).unwrap_or_default())
}
