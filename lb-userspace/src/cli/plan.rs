//! `lb plan`: what a change would do before it is applied.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::Value;

use super::{backend::BackendArgs, shared::read_file};
use crate::{api::Request, control::preview::PlanChange, model::Strategy};

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// A backend's new weight.
    Weight {
        service: String,
        id: String,
        weight: u32,
    },
    /// A new backend.
    AddBackend(BackendArgs),
    /// A backend removed.
    RemoveBackend { service: String, id: String },
    /// A service's new strategy.
    Strategy { service: String, strategy: Strategy },
    /// A whole config file (its services; [daemon] is not previewed).
    Config { file: PathBuf },
}

pub fn request(cmd: &PlanCmd) -> anyhow::Result<Request> {
    let change = match cmd {
        PlanCmd::Weight { service, id, weight } => PlanChange::Weight {
            service: service.clone(),
            id: id.clone(),
            weight: *weight,
        },
        PlanCmd::AddBackend(a) => PlanChange::AddBackend {
            service: a.service.clone(),
            backend: Box::new(a.spec()),
        },
        PlanCmd::RemoveBackend { service, id } => PlanChange::RemoveBackend {
            service: service.clone(),
            id: id.clone(),
        },
        PlanCmd::Strategy { service, strategy } => PlanChange::Strategy {
            service: service.clone(),
            strategy: *strategy,
        },
        PlanCmd::Config { file } => PlanChange::Config {
            text: read_file(file)?,
        },
    };
    Ok(Request::Plan { change })
}

pub fn print(data: &Value) {
    for s in data["services"].as_array().into_iter().flatten() {
        let name = s["service"].as_str().unwrap_or_default();
        if s["removed"] == true {
            println!(
                "{name}: removed; {} live flows lose their backend",
                s["live_flows"]
            );
            continue;
        }
        let moved = match (s["entries_moved"].as_u64(), s["share_moved"].as_f64()) {
            (Some(m), Some(f)) => format!("{m} moved ({:.1}%)", f * 100.0),
            _ => "new".to_string(),
        };
        println!(
            "{name}: {} {} entries, {moved}; {} live flows, {} would change backend if their entry were lost",
            s["strategy"].as_str().unwrap_or_default(),
            s["entries"],
            s["live_flows"],
            s["flows_moving_if_lost"],
        );
    }
}
