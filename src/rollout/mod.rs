//! Fleet-wide rollout control: one record in etcd that every Envoy of the fleet reads (abort,
//! resume, percent), written by any Envoy whose guard aborts, and one fleet judgment of the
//! summed window counts by an elected Envoy. Pure: the filter performs the etcd requests and
//! applies the decisions; `handoffctl rollout` and the host simulation use the same code.

pub mod record;

#[cfg(test)]
mod tests;
