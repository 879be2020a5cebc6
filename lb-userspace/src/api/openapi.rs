//! The OpenAPI 3 document, generated from the handlers and types. `docs/openapi.json` is a
//! committed copy; a test fails when the two differ.

use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use super::{ApiError, Envelope, server};

#[derive(OpenApi)]
#[openapi(
    info(title = "lb control API", description = "Services, instances (backends), health, stats and lookups of the XDP load balancer. On TCP every request needs a bearer token: the read token for GET, the admin token for changes."),
    paths(
        server::status,
        server::config,
        server::list_services,
        server::get_service,
        server::add_service,
        server::remove_service,
        server::add_instance,
        server::list_instances,
        server::remove_instance,
        server::set_weight,
        server::drain_instance,
        server::undrain_instance,
        server::set_strategy,
        server::plan,
        server::set_health,
        server::report_load,
        server::heartbeat,
        server::pick,
        server::health,
        server::stats,
        server::lookup,
        server::reload,
        server::geo,
        server::geo_reload,
        server::shutdown,
        server::node,
        server::drain,
        server::undrain,
        server::cluster_status,
        server::cluster_push,
    ),
    components(schemas(Envelope, ApiError, server::WeightBody, server::HealthBody, server::LoadBody)),
    modifiers(&Bearer),
    security(("bearer" = []))
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // On TCP every operation may answer 401 (no or unknown token) and 403 (a read token on
        // a change).
        let refused = |description: &str| {
            utoipa::openapi::ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ApiError")))
                        .build(),
                )
                .build()
        };
        for item in api.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete]
                .into_iter()
                .flatten()
            {
                op.responses
                    .responses
                    .insert("401".into(), refused("No bearer token, or an unknown one").into());
                op.responses
                    .responses
                    .insert("403".into(), refused("A read token on a change").into());
            }
        }
    }
}

/// The document as pretty JSON.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    /// The committed copy is the generated document. To update it after an API change:
    /// `LB_WRITE_OPENAPI=1 cargo test -p lb-userspace openapi`.
    #[test]
    fn the_committed_openapi_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let generated = super::document() + "\n";
        if std::env::var_os("LB_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &generated).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json differs from the API's document: run LB_WRITE_OPENAPI=1 cargo test -p lb-userspace openapi"
        );
    }
}
