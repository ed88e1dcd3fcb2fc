//! The store's error type. Each variant names what failed and on what; the underlying
//! cause (a `sqlx::Error`, ...) is the `source`, not repeated in the message.

use crate::types::{Generation, HostName, InstanceId, MacAddr};

/// Anything the store can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL cannot be used. `url` is already redacted.
    #[error("database URL {url:?} is not usable: {reason}")]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database did not accept a connection. `url` is already redacted.
    #[error("cannot connect to database {url}")]
    Connect {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the schema migrations failed.
    #[error("migrating database {url}")]
    Migrate {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What the migrator said.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// The schema is older than this program expects.
    #[error("database {url} has schema version {applied}, this program needs {latest}: run `nodekeeper-provisioner db migrate`")]
    SchemaBehind {
        /// The URL with any password replaced by `***`.
        url: String,
        /// The newest migration applied (0: none).
        applied: i64,
        /// The newest migration this program ships.
        latest: i64,
    },
    /// The schema is newer than this program knows: a newer version migrated it.
    #[error("database {url} has schema version {applied}, newer than this program's {latest}: upgrade nodekeeper")]
    SchemaAhead {
        /// The URL with any password replaced by `***`.
        url: String,
        /// The newest migration applied.
        applied: i64,
        /// The newest migration this program ships.
        latest: i64,
    },
    /// A query failed; `what` says which operation it served.
    #[error("database error while {what}")]
    Query {
        /// The operation, as a gerund phrase ("listing hosts").
        what: &'static str,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },
    /// A row holds a value this program cannot read (edited by hand, or a newer schema).
    #[error("corrupt row in {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A request the store cannot carry out as asked (says why).
    #[error("{0}")]
    Invalid(String),
    /// No host of that name.
    #[error("unknown host {0}")]
    UnknownHost(HostName),
    /// A host of that name exists already.
    #[error("host {0} already exists")]
    HostExists(HostName),
    /// Another host has that boot MAC.
    #[error("MAC {mac} already belongs to host {host}")]
    MacInUse {
        /// The MAC asked for.
        mac: MacAddr,
        /// The host that has it.
        host: HostName,
    },
    /// The host cannot be removed: it is in service, or something is still its.
    #[error("host {host} cannot be removed: {why}")]
    HostInUse {
        /// The host.
        host: HostName,
        /// Why not.
        why: String,
    },
    /// The host cannot take that action in its current state.
    #[error("host {host} is {state}, not active")]
    HostNotActive {
        /// The host.
        host: HostName,
        /// Its state.
        state: crate::HostState,
    },
    /// Moving the instance off its host could run it twice: the host is not known to be off.
    #[error(
        "instance {instance} is on {host}, which is {state}: {why}. Moving it could run it twice; fence the host \
         (or stop the instance and put the host in maintenance) first, or pass --force"
    )]
    SourceLive {
        /// The instance.
        instance: InstanceId,
        /// Its current owner.
        host: HostName,
        /// The owner's state.
        state: crate::HostState,
        /// What is known of it there.
        why: String,
    },
    /// This writer's leadership term is over (another replica took the role, or the lease
    /// expired): nothing was written.
    #[error("the {role} lease of term {term} is no longer held: not acting")]
    LeaseLost {
        /// The role.
        role: String,
        /// The term this writer acted under.
        term: i64,
    },
    /// No catalogue image of that name.
    #[error("unknown image {0} (image list shows the catalogue)")]
    UnknownImage(String),
    /// A catalogue image of that name exists already.
    #[error("image {0} already exists (image remove it first, or choose another name)")]
    ImageExists(String),
    /// The image is in use and cannot be removed.
    #[error("image {name} is in use: {by}")]
    ImageInUse {
        /// The image.
        name: String,
        /// Who uses it.
        by: String,
    },
    /// No service of that name.
    #[error("unknown service {0} (service list shows them)")]
    UnknownService(String),
    /// No admin token of that name.
    #[error("unknown token {0} (token list shows them)")]
    UnknownToken(String),
    /// An admin token of that name exists (revoked tokens keep their names).
    #[error("token {0} already exists (revoked tokens keep their names: choose another)")]
    TokenExists(String),
    /// No instance with that UUID.
    #[error("unknown instance {0}")]
    UnknownInstance(InstanceId),
    /// An instance with that UUID exists already.
    #[error("instance {0} already exists")]
    InstanceExists(InstanceId),
    /// The instance is tombstoned.
    #[error("instance {0} is deleted")]
    InstanceDeleted(InstanceId),
    /// A compare-and-set on the generation lost: someone else changed the owner first.
    #[error("instance {instance} changed concurrently: expected generation {expected}, found {found}")]
    Conflict {
        /// The instance.
        instance: InstanceId,
        /// The generation the caller based its change on.
        expected: Generation,
        /// The generation now in the database.
        found: Generation,
    },
    /// One item of a batch was refused; nothing of the batch was written.
    #[error("item {index}")]
    Item {
        /// The 0-based position of the item in the batch.
        index: usize,
        /// Why it was refused.
        #[source]
        source: Box<StoreError>,
    },
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Wraps a `sqlx::Error` as a [`StoreError::Query`] naming the operation.
pub(crate) fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}
