//! End-to-end forwarding through veth: the balancer against nftables DNAT and HAProxy.

/// One measured case: absolute rates for each contender (`None` where it does not apply).
#[derive(Clone, Debug, serde::Serialize)]
pub struct E2eResult {
    pub case: String,
    pub unit: String,
    pub lb: Option<f64>,
    pub nftables: Option<f64>,
    pub haproxy: Option<f64>,
}

pub fn run(_quick: bool) -> anyhow::Result<Vec<E2eResult>> {
    anyhow::bail!("not written yet")
}
