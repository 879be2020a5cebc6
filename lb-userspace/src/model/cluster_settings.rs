//! `[cluster]`: the nodes of one tier share one desired state in etcd, under `/lb/<name>/`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// etcd's client URLs (`http://host:2379`, or `https://` with `etcd_ca`).
    pub etcd: Vec<String>,
    /// The cluster's name: its keys live under `/lb/<name>/`.
    pub name: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// The CA (PEM) that signed etcd's server certificate; needed by `https://` endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate chain and its key (PEM) for etcd's `--client-cert-auth`: both or
    /// neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_key: Option<PathBuf>,
    /// An etcd user (RBAC) and the file holding its password (never the TOML): both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_password_file: Option<PathBuf>,
}

impl ClusterSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd.is_empty() {
            return Err("cluster.etcd names no endpoint".into());
        }
        for e in &self.etcd {
            let rest = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                return Err(format!("cluster.etcd {e:?} is not an http:// or https:// URL"));
            }
        }
        // The etcd client takes one TLS setting for every endpoint: all or none use it.
        let https = self.etcd.iter().filter(|e| e.starts_with("https://")).count();
        if https > 0 && https < self.etcd.len() {
            return Err("cluster.etcd mixes http:// and https:// endpoints: use one scheme".into());
        }
        if https > 0 && self.etcd_ca.is_none() {
            return Err(format!(
                "cluster.etcd {} is https:// but cluster.etcd_ca is not set (fix: etcd_ca = the PEM file of the CA that signed etcd's certificate)",
                self.etcd[0]
            ));
        }
        if https == 0 {
            for (set, key) in [
                (self.etcd_ca.is_some(), "etcd_ca"),
                (self.etcd_cert.is_some(), "etcd_cert"),
            ] {
                if set {
                    return Err(format!(
                        "cluster.{key} is set but cluster.etcd {} is plaintext http:// (fix: https:// endpoints)",
                        self.etcd[0]
                    ));
                }
            }
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err("cluster.etcd_cert and etcd_key go together (both or neither)".into());
        }
        if self.etcd_user.is_some() != self.etcd_password_file.is_some() {
            return Err(
                "cluster.etcd_user and etcd_password_file go together (both or neither; the password is read from the file)"
                    .into(),
            );
        }
        if let Some(u) = &self.etcd_user
            && (u.is_empty() || u.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            return Err(format!("cluster.etcd_user {u:?} is empty or holds spaces"));
        }
        super::validate_name("cluster.name", &self.name, 64).map_err(|e| e.to_string())?;
        super::validate_name("cluster.node", &self.node, 64).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Every key of the cluster starts with this.
    pub fn prefix(&self) -> String {
        format!("/lb/{}/", self.name)
    }

    /// The endpoints that are plaintext and not on this host (`lb config check` warns).
    pub fn plaintext_remote(&self) -> Vec<&str> {
        self.etcd
            .iter()
            .filter(|e| e.starts_with("http://") && !is_loopback_url(e))
            .map(String::as_str)
            .collect()
    }
}

/// `http://127.0.0.1:2379`, `http://[::1]:2379`, `http://localhost:2379`.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(etcd: &[&str]) -> ClusterSettings {
        ClusterSettings {
            etcd: etcd.iter().map(|e| e.to_string()).collect(),
            name: "edge".into(),
            node: "n1".into(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_user: None,
            etcd_password_file: None,
        }
    }

    #[test]
    fn tls_and_auth_settings_go_together_and_bad_ones_get_one_line() {
        let err = |s: &ClusterSettings| s.validate().unwrap_err();
        let mut s = settings(&["https://10.0.0.1:2379"]);
        assert!(err(&s).contains("etcd_ca is not set"), "{}", err(&s));
        s.etcd_ca = Some("/ca.pem".into());
        s.validate().unwrap();
        s.etcd_cert = Some("/c.pem".into());
        assert!(
            err(&s).contains("etcd_cert and etcd_key go together"),
            "{}",
            err(&s)
        );
        s.etcd_key = Some("/k.pem".into());
        s.validate().unwrap();
        s.etcd_user = Some("lb".into());
        assert!(
            err(&s).contains("etcd_user and etcd_password_file"),
            "{}",
            err(&s)
        );
        s.etcd_password_file = Some("/pw".into());
        s.validate().unwrap();
        s.etcd.push("http://10.0.0.2:2379".into());
        assert!(err(&s).contains("mixes http:// and https://"), "{}", err(&s));

        let mut plain = settings(&["http://10.0.0.1:2379"]);
        plain.etcd_ca = Some("/ca.pem".into());
        assert!(err(&plain).contains("etcd_ca is set but"), "{}", err(&plain));
        // A user over plaintext is legal (a loopback etcd); config check warns off-host.
        let mut plain = settings(&["http://10.0.0.1:2379"]);
        plain.etcd_user = Some("lb".into());
        plain.etcd_password_file = Some("/pw".into());
        plain.validate().unwrap();
        for e in [err(&s), err(&settings(&["https://h:2379"]))] {
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn plaintext_remote_endpoints_are_those_off_this_host() {
        let s = settings(&[
            "http://127.0.0.1:2379",
            "http://[::1]:2379",
            "http://localhost:2379",
            "http://10.0.0.1:2379",
            "http://[fd00::1]:2379",
            "http://etcd.example:2379",
        ]);
        assert_eq!(
            s.plaintext_remote(),
            [
                "http://10.0.0.1:2379",
                "http://[fd00::1]:2379",
                "http://etcd.example:2379"
            ]
        );
        assert!(settings(&["https://10.0.0.1:2379"]).plaintext_remote().is_empty());
    }
}
