//! The accelerator catalogue: every model the fleet may hold, with its rated dense FP16 TFLOPS,
//! memory and vendor. It is data (`deploy/catalogue.toml`, each figure with its source), compiled
//! in as the default.

use rustc_hash::FxHashMap;
use serde::Deserialize;

use crate::units::ModelIx;

/// The catalogue shipped with suanli.
pub const BUILTIN_CATALOGUE: &str = include_str!("../../../deploy/catalogue.toml");

/// At most this many models: constraint filters keep the allowed models in a 64-bit set.
pub const MAX_MODELS: usize = 64;

/// One accelerator model.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceleratorModel {
    /// Lowercase id used by fleets and requests, e.g. `h100`.
    pub id: String,
    /// Full product name.
    pub name: String,
    /// Vendor, e.g. `nvidia`, `huawei`, `amd`.
    pub vendor: String,
    /// Rated peak dense FP16/BF16 tensor TFLOPS of one device.
    pub fp16_dense_tflops: u32,
    /// Device memory in GiB.
    pub memory_gib: u32,
}

/// Errors reading a catalogue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    /// The TOML text does not parse or does not have the catalogue's shape.
    #[error("catalogue: {0}")]
    Parse(String),
    /// A model entry is invalid.
    #[error("catalogue: model {model}: field {field}: {reason}")]
    Invalid {
        /// The model's id.
        model: String,
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueFile {
    model: Vec<AcceleratorModel>,
}

/// The set of known accelerator models, indexed by [`ModelIx`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Catalogue {
    models: Vec<AcceleratorModel>,
    by_id: FxHashMap<String, ModelIx>,
}

impl Catalogue {
    /// Parses and validates a catalogue in the `deploy/catalogue.toml` format.
    pub fn from_toml(text: &str) -> Result<Self, CatalogueError> {
        let file: CatalogueFile =
            toml::from_str(text).map_err(|e| CatalogueError::Parse(e.to_string()))?;
        Self::new(file.model)
    }

    /// Builds a catalogue from models, rejecting duplicates, zero throughput and too many models.
    pub fn new(models: Vec<AcceleratorModel>) -> Result<Self, CatalogueError> {
        if models.len() > MAX_MODELS {
            return Err(CatalogueError::Parse(format!(
                "{} models, at most {MAX_MODELS} are supported",
                models.len()
            )));
        }
        let mut by_id = FxHashMap::default();
        for (i, m) in models.iter().enumerate() {
            let invalid = |field, reason: &str| CatalogueError::Invalid {
                model: m.id.clone(),
                field,
                reason: reason.to_string(),
            };
            if m.id.is_empty() {
                return Err(invalid("id", "must not be empty"));
            }
            if m.fp16_dense_tflops == 0 {
                return Err(invalid("fp16_dense_tflops", "must be positive"));
            }
            if by_id.insert(m.id.clone(), ModelIx(i as u16)).is_some() {
                return Err(invalid("id", "duplicate model id"));
            }
        }
        Ok(Self { models, by_id })
    }

    /// The catalogue compiled into the binary.
    pub fn builtin() -> Self {
        Self::from_toml(BUILTIN_CATALOGUE).expect("the built-in catalogue is valid (tested)")
    }

    /// Looks a model up by its id.
    pub fn lookup(&self, id: &str) -> Option<ModelIx> {
        self.by_id.get(id).copied()
    }

    /// The model at an index returned by [`Catalogue::lookup`].
    pub fn model(&self, ix: ModelIx) -> &AcceleratorModel {
        &self.models[ix.0 as usize]
    }

    /// All models in catalogue order.
    pub fn models(&self) -> &[AcceleratorModel] {
        &self.models
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether the catalogue has no model.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalogue_has_the_required_models() {
        let c = Catalogue::builtin();
        for id in [
            "h100",
            "h800",
            "h20",
            "a800",
            "l40s",
            "rtx4090",
            "ascend-910b",
            "mi300x",
        ] {
            let ix = c.lookup(id).unwrap_or_else(|| panic!("{id} missing"));
            assert!(c.model(ix).fp16_dense_tflops > 0);
            assert!(c.model(ix).memory_gib > 0);
        }
        assert_eq!(c.model(c.lookup("h100").unwrap()).fp16_dense_tflops, 989);
    }

    #[test]
    fn duplicate_and_zero_models_are_named() {
        let text = r#"
            [[model]]
            id = "x"
            name = "X"
            vendor = "v"
            fp16_dense_tflops = 0
            memory_gib = 1
        "#;
        let err = Catalogue::from_toml(text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "catalogue: model x: field fp16_dense_tflops: must be positive"
        );
        let dup = text.replace("= 0", "= 5").repeat(2);
        let err = Catalogue::from_toml(&dup).unwrap_err();
        assert!(err.to_string().contains("duplicate model id"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Catalogue::from_toml("[[model]]\nid = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
