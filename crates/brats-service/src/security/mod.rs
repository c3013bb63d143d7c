//! Transport security, identity, authorisation and audit, once for every service: the gRPC
//! shell ([`crate::GrpcServer`]) terminates TLS ([`tls`]), authenticates each request
//! ([`auth`]: JWT, API key, mutual-TLS identity), checks the RPC against the default-deny map
//! ([`authz`]) and records the decision ([`audit`]). Handlers see the caller as a
//! [`Principal`] in the request's extensions.

pub mod audit;
pub mod auth;
pub mod authz;
pub mod layer;
pub mod principal;
pub mod tenants;
pub mod tls;

pub use principal::{AuthMethod, Principal};
