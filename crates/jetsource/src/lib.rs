//! jetsource for applications.
//!
//! An application is a crate that declares its domain once, in an [`App`]:
//! its aggregates (with their upcasters) and its projections (with their
//! queries). Its binaries are one line each:
//!
//! ```no_run
//! # fn app() -> jetsource::App { jetsource::App::new("shop") }
//! // src/bin/shop-command.rs
//! fn main() -> std::process::ExitCode {
//!     jetsource::bin::command(app())
//! }
//! ```
//!
//! [`bin::command`], [`bin::projector`], [`bin::snapshotter`] and
//! [`bin::cli`] are the whole fleet; nothing in jetsource knows any
//! application. docs/GUIDE.md walks through it from `cargo new`.

pub mod bin;

use std::sync::Arc;

pub use jetsource_aggregate as domain;
pub use jetsource_aggregate::{testing, Aggregate, DomainError, Registry, Upcaster};
pub use jetsource_core as core;
pub use jetsource_core::config::Config;
pub use jetsource_core::envelope::RecordedEvent;
pub use jetsource_projector::keys::KeySpace;
pub use jetsource_projector::projection::{decode, Op, Projection, ProjectionError};
pub use jetsource_projector::read::{Param, ParamKind, QueryCall, QueryError, QuerySpec, ReadView};
pub use jetsource_projector::redis;
pub use jetsource_projector::Router;
pub use {futures, serde_json};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type MakeProjection = Arc<dyn Fn(&Config) -> Arc<dyn Projection> + Send + Sync>;

/// One application: what every jetsource binary of it serves.
#[derive(Clone)]
pub struct App {
    name: &'static str,
    registry: Registry,
    projections: Vec<MakeProjection>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name)
            .field("registry", &self.registry)
            .field("projections", &self.projections.len())
            .finish()
    }
}

impl App {
    /// `name` prefixes the binaries' names in help and logs
    /// (`<name>-command`, ...).
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            registry: Registry::new(),
            projections: Vec::new(),
        }
    }

    /// Serves aggregate `A` (commands on `cmd.<A::TYPE>.<id>`), reading its
    /// older events through `A::UPCASTERS`.
    pub fn aggregate<A: Aggregate>(mut self) -> Self {
        self.registry = self.registry.register::<A>();
        self
    }

    /// Drives process manager `P` (the process worker, [`bin::process`]);
    /// its instances read like aggregates of type `P::TYPE` everywhere
    /// else (`state`, `history`), and take no commands.
    pub fn process<P: domain::process::Process>(mut self) -> Self {
        self.registry = self.registry.register_process::<P>();
        self
    }

    /// Keeps `projection` and serves its queries.
    pub fn projection(mut self, projection: impl Projection) -> Self {
        let projection: Arc<dyn Projection> = Arc::new(projection);
        self.projections.push(Arc::new(move |_| projection.clone()));
        self
    }

    /// Like [`App::projection`], for a projection that takes settings from
    /// the loaded configuration.
    pub fn projection_with<P: Projection>(
        mut self,
        make: impl Fn(&Config) -> P + Send + Sync + 'static,
    ) -> Self {
        self.projections
            .push(Arc::new(move |config| Arc::new(make(config)) as Arc<_>));
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The projections for `config`, each reading events through the
    /// upcasters. Panics when two projections share a name or two queries
    /// a subject: programming errors, caught by the application's first
    /// test.
    pub fn projections(&self, config: &Config) -> Vec<Arc<dyn Projection>> {
        let projections: Vec<_> = self.projections.iter().map(|make| make(config)).collect();
        for (i, p) in projections.iter().enumerate() {
            assert!(
                projections[..i].iter().all(|o| o.name() != p.name()),
                "projection {} declared twice",
                p.name()
            );
        }
        if let Err(e) = Router::new(&projections) {
            panic!("{}: {e}", self.name);
        }
        jetsource_projector::projection::with_upcasting(&self.registry, projections)
    }
}
