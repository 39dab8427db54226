//! The accelerator catalogue, read from the same `deploy/catalogue.toml` the platform uses,
//! so that TFLOPS figures live in exactly one place.

use serde::Deserialize;

const CATALOGUE_TOML: &str = include_str!("../../../deploy/catalogue.toml");

/// The part of a catalogue entry the generator needs; other keys are the core's business.
#[derive(Deserialize)]
struct ModelEntry {
    id: String,
    fp16_dense_tflops: u64,
}

#[derive(Deserialize)]
struct CatalogueFile {
    model: Vec<ModelEntry>,
}

/// Rated dense FP16 TFLOPS per device, by catalogue id.
pub(crate) struct Catalogue {
    models: Vec<ModelEntry>,
}

impl Catalogue {
    /// The catalogue compiled into this crate. Panics if the file does not parse: it is part
    /// of the source tree, and the tests parse it.
    pub fn embedded() -> Self {
        let file: CatalogueFile =
            toml::from_str(CATALOGUE_TOML).expect("deploy/catalogue.toml should parse");
        Catalogue { models: file.model }
    }

    #[cfg(test)]
    pub fn contains(&self, model: &str) -> bool {
        self.models.iter().any(|entry| entry.id == model)
    }

    /// Panics on an unknown id: the generator only uses ids from its own tables, and a test
    /// checks that every one of them is in the catalogue.
    pub fn tflops(&self, model: &str) -> u64 {
        self.models
            .iter()
            .find(|entry| entry.id == model)
            .map(|entry| entry.fp16_dense_tflops)
            .unwrap_or_else(|| panic!("model {model:?} is not in deploy/catalogue.toml"))
    }
}
