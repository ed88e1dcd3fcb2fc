//! Reimaging a host: the persisted state machine ([`machine`]). The executor inside `serve`,
//! the deploy API and the deploy agent come next (see the remaining work).

pub mod machine;
