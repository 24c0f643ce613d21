//! Contract test: every request the Firecracker driver can send conforms to Firecracker's published API description.
//!
//! The description (Firecracker 1.17's `src/firecracker/swagger/firecracker.yaml`, swagger 2.0) is
//! third-party text kept outside this repository: the crate's `build.rs` finds it (see there), and
//! where it is absent every test here is ignored with a `SKIPPED` reason rather than passed. It is
//! read as data and each of `ApiRequest::all_examples()` is checked against it: its path matches a declared
//! template, its method is declared there with the expected `operationId`, and its body validates
//! against the body parameter's schema (required properties, declared properties only, JSON
//! types, enums, numeric bounds), following `$ref`s as deep as they go. The validator is itself
//! tested against deliberately bad requests, so a green run means "checked", not "skipped".

use std::fmt;

use banger_server::host::vmm::firecracker_api::ApiRequest;
use serde_json::{Map, Value, json};
use yaml_rust2::{Yaml, YamlLoader};

/// Where `build.rs` found the description.
#[cfg(firecracker_api)]
const API_DESCRIPTION: &str = env!("BANGER_FIRECRACKER_API");
#[cfg(not(firecracker_api))]
const API_DESCRIPTION: &str = "";

/// How many `$ref` hops are followed before the description is deemed cyclic.
const MAX_REF_DEPTH: usize = 16;

/// Which rule of the description a request breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// The path matches no template under `paths`.
    UnknownPath,
    /// The template does not declare this method.
    UndeclaredMethod,
    /// The operation's `operationId` is not the one the request claims.
    OperationId,
    /// The operation requires a body and none is sent.
    MissingBody,
    /// A body is sent to an operation that declares none.
    UnexpectedBody,
    /// A body property repeats a path parameter with another value; Firecracker refuses that.
    PathBodyMismatch,
    /// A `required` property is absent.
    Required,
    /// A property the definition does not declare. Swagger allows extra properties unless told
    /// otherwise, but Firecracker deserializes with `deny_unknown_fields`, so one is a 400.
    UnknownProperty,
    /// A value's JSON type is not the declared `type`.
    WrongType,
    /// A value is not one of the declared `enum` values.
    NotInEnum,
    /// A number is outside the declared `minimum`/`maximum`.
    OutOfRange,
    /// The description itself has a `$ref` that resolves to nothing, or a cycle.
    BrokenRef,
}

/// One broken rule, located.
#[derive(Debug, Clone)]
struct Violation {
    rule: Rule,
    /// Where: `path`, `method`, `body`, or a property path such as `body.rate_limiter.ops.size`.
    at: String,
    detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:?} at {}: {}", self.rule, self.at, self.detail)
    }
}

/// Firecracker's API description: its `paths` and `definitions`, converted to JSON values.
struct ApiDescription {
    paths: Map<String, Value>,
    definitions: Map<String, Value>,
}

impl ApiDescription {
    fn load() -> Self {
        let text = std::fs::read_to_string(API_DESCRIPTION).unwrap_or_else(|error| {
            panic!("cannot read the Firecracker API description at {API_DESCRIPTION}: {error}")
        });
        let documents = YamlLoader::load_from_str(&text).expect("the Firecracker API description parses as YAML");
        let document = yaml_to_json(documents.first().expect("the description has one YAML document"));
        let section = |name: &str| {
            document
                .get(name)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_else(|| panic!("description has no {name}"))
        };
        assert_eq!(document.get("swagger"), Some(&json!("2.0")), "the validator understands swagger 2.0 only");
        Self { paths: section("paths"), definitions: section("definitions") }
    }

    /// Every rule that `method path` with `body` breaks; empty when it conforms.
    fn violations(&self, method: &str, path: &str, body: Option<&Value>, operation_id: Option<&str>) -> Vec<Violation> {
        let mut violations = Vec::new();
        let Some((template, operations)) = self.template_for(path) else {
            violations.push(violation(Rule::UnknownPath, "path", format!("{path} matches no declared path template")));
            return violations;
        };
        let Some(operation) = operations.get(&method.to_ascii_lowercase()) else {
            let declared: Vec<&String> = operations.keys().collect();
            violations.push(violation(
                Rule::UndeclaredMethod,
                "method",
                format!("{method} is not declared for {template} (declared: {declared:?})"),
            ));
            return violations;
        };
        if let Some(expected) = operation_id {
            let declared = operation.get("operationId").and_then(Value::as_str);
            if declared != Some(expected) {
                violations.push(violation(
                    Rule::OperationId,
                    "method",
                    format!("{method} {template} is operation {declared:?}, not {expected:?}"),
                ));
            }
        }
        let parameters = operation.get("parameters").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let body_parameter = parameters.iter().find(|parameter| parameter.get("in") == Some(&json!("body")));
        match (body_parameter, body) {
            (None, None) => {}
            (None, Some(_)) => violations.push(violation(
                Rule::UnexpectedBody,
                "body",
                format!("{method} {template} declares no body parameter"),
            )),
            (Some(parameter), None) => {
                if parameter.get("required") == Some(&json!(true)) {
                    violations.push(violation(
                        Rule::MissingBody,
                        "body",
                        format!("{method} {template} requires a body"),
                    ));
                }
            }
            (Some(parameter), Some(body)) => {
                let schema = parameter.get("schema").unwrap_or(&Value::Null);
                self.check(schema, body, "body", &mut violations, 0);
                check_path_parameters(template, path, body, &mut violations);
            }
        }
        violations
    }

    /// The template `path` matches, preferring the one with most literal segments (so a
    /// `/balloon/statistics` would win over a `/balloon/{id}`).
    fn template_for(&self, path: &str) -> Option<(&str, &Map<String, Value>)> {
        let segments: Vec<&str> = path.split('/').collect();
        self.paths
            .iter()
            .filter_map(|(template, operations)| {
                let template_segments: Vec<&str> = template.split('/').collect();
                let matches = template_segments.len() == segments.len()
                    && template_segments
                        .iter()
                        .zip(&segments)
                        .all(|(expected, actual)| (is_parameter(expected) && !actual.is_empty()) || expected == actual);
                let literals = template_segments.iter().filter(|segment| !is_parameter(segment)).count();
                matches.then_some((literals, template.as_str(), operations.as_object()?))
            })
            .max_by_key(|(literals, _, _)| *literals)
            .map(|(_, template, operations)| (template, operations))
    }

    /// Follows `$ref: '#/definitions/X'` until a schema without one; returns it and the last name.
    fn resolve<'a>(&'a self, mut schema: &'a Value) -> Result<(&'a Value, Option<&'a str>), String> {
        let mut name = None;
        for _ in 0..MAX_REF_DEPTH {
            let Some(reference) = schema.get("$ref").and_then(Value::as_str) else {
                return Ok((schema, name));
            };
            let definition = reference
                .strip_prefix("#/definitions/")
                .ok_or_else(|| format!("{reference} is not a local definition"))?;
            let (key, target) =
                self.definitions.get_key_value(definition).ok_or_else(|| format!("{reference} names no definition"))?;
            name = Some(key.as_str());
            schema = target;
        }
        Err(format!("more than {MAX_REF_DEPTH} $ref hops: a cycle"))
    }

    /// Checks `value` at `at` against `schema`, recursing into objects and arrays.
    fn check(&self, schema: &Value, value: &Value, at: &str, violations: &mut Vec<Violation>, depth: usize) {
        let (schema, name) = match self.resolve(schema) {
            Ok(resolved) => resolved,
            Err(detail) => return violations.push(violation(Rule::BrokenRef, at, detail)),
        };
        let what = name.map(|name| format!(" ({name})")).unwrap_or_default();
        if depth > MAX_REF_DEPTH {
            return violations.push(violation(
                Rule::BrokenRef,
                at,
                format!("schema nests deeper than {MAX_REF_DEPTH}"),
            ));
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            violations.push(violation(Rule::NotInEnum, at, format!("{value} is not one of {allowed:?}{what}")));
        }
        let Some(declared_type) = schema.get("type").and_then(Value::as_str) else {
            return;
        };
        if !has_json_type(value, declared_type) {
            return violations.push(violation(
                Rule::WrongType,
                at,
                format!("expected {declared_type}{what}, got {}", json_type(value)),
            ));
        }
        match declared_type {
            "object" => self.check_object(schema, value, at, &what, violations, depth),
            "array" => {
                if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
                    for (index, item) in values.iter().enumerate() {
                        self.check(items, item, &format!("{at}[{index}]"), violations, depth + 1);
                    }
                }
            }
            "integer" | "number" => check_bounds(schema, value, at, &what, violations),
            _ => {}
        }
    }

    fn check_object(
        &self,
        schema: &Value,
        value: &Value,
        at: &str,
        what: &str,
        violations: &mut Vec<Violation>,
        depth: usize,
    ) {
        let Some(fields) = value.as_object() else { return };
        let no_properties = Map::new();
        let properties = schema.get("properties").and_then(Value::as_object).unwrap_or(&no_properties);
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let required = required.as_str().unwrap_or_default();
            if !fields.contains_key(required) {
                violations.push(violation(
                    Rule::Required,
                    format!("{at}.{required}"),
                    format!("required{what} but missing"),
                ));
            }
        }
        let additional = schema.get("additionalProperties");
        for (field, field_value) in fields {
            let field_at = format!("{at}.{field}");
            match (properties.get(field), additional) {
                (Some(field_schema), _) => self.check(field_schema, field_value, &field_at, violations, depth + 1),
                (None, Some(extra_schema)) if extra_schema.is_object() => {
                    self.check(extra_schema, field_value, &field_at, violations, depth + 1)
                }
                (None, Some(Value::Bool(true))) => {}
                (None, _) => {
                    let declared: Vec<&String> = properties.keys().collect();
                    violations.push(violation(
                        Rule::UnknownProperty,
                        field_at,
                        format!("not a property{what}; declared: {declared:?}"),
                    ));
                }
            }
        }
    }
}

fn violation(rule: Rule, at: impl Into<String>, detail: String) -> Violation {
    Violation { rule, at: at.into(), detail }
}

fn is_parameter(segment: &str) -> bool {
    segment.starts_with('{') && segment.ends_with('}')
}

/// Firecracker refuses a body whose id differs from the path's (`/drives/a` with `drive_id: b`).
fn check_path_parameters(template: &str, path: &str, body: &Value, violations: &mut Vec<Violation>) {
    for (template_segment, segment) in template.split('/').zip(path.split('/')) {
        let Some(name) = template_segment.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) else {
            continue;
        };
        if let Some(in_body) = body.get(name)
            && in_body.as_str() != Some(segment)
        {
            violations.push(violation(
                Rule::PathBodyMismatch,
                format!("body.{name}"),
                format!("{in_body} differs from the path's {segment:?}"),
            ));
        }
    }
}

fn check_bounds(schema: &Value, value: &Value, at: &str, what: &str, violations: &mut Vec<Violation>) {
    let Some(number) = value.as_f64() else { return };
    if let Some(minimum) = schema.get("minimum").and_then(Value::as_f64)
        && number < minimum
    {
        violations.push(violation(Rule::OutOfRange, at, format!("{value} is below the minimum {minimum}{what}")));
    }
    if let Some(maximum) = schema.get("maximum").and_then(Value::as_f64)
        && number > maximum
    {
        violations.push(violation(Rule::OutOfRange, at, format!("{value} is above the maximum {maximum}{what}")));
    }
}

fn has_json_type(value: &Value, declared: &str) -> bool {
    match declared {
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        // An unknown type in the description is not something a request can violate.
        _ => true,
    }
}

fn json_type(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "boolean".into(),
        Value::Number(number) if number.is_f64() => format!("number {number}"),
        Value::Number(number) => format!("integer {number}"),
        Value::String(text) => format!("string {text:?}"),
        Value::Array(_) => "array".into(),
        Value::Object(_) => "object".into(),
    }
}

/// YAML to JSON; mapping keys become strings (response codes such as `200:` are integers in YAML).
fn yaml_to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(text) => text
            .parse()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(text.clone()), Value::Number),
        Yaml::Integer(number) => Value::from(*number),
        Yaml::String(text) => Value::String(text.clone()),
        Yaml::Boolean(flag) => Value::Bool(*flag),
        Yaml::Array(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Hash(entries) => Value::Object(
            entries
                .iter()
                .map(|(key, value)| {
                    let key = match yaml_to_json(key) {
                        Value::String(text) => text,
                        other => other.to_string(),
                    };
                    (key, yaml_to_json(value))
                })
                .collect(),
        ),
        Yaml::Null => Value::Null,
        Yaml::Alias(_) | Yaml::BadValue => {
            panic!("the description uses a YAML construct the test cannot read: {yaml:?}")
        }
    }
}

fn label(request: &ApiRequest) -> String {
    format!("{} {} ({})", request.method(), request.path(), request.operation_id())
}

#[test]
#[cfg_attr(not(firecracker_api), ignore = "SKIPPED: no Firecracker API description (set BANGER_FIRECRACKER_API)")]
fn every_request_the_driver_sends_conforms_to_the_api_description() {
    let description = ApiDescription::load();
    let examples = ApiRequest::all_examples();
    assert!(!examples.is_empty(), "ApiRequest::all_examples() returned nothing to check");
    let mut report = Vec::new();
    for request in &examples {
        let body = request.body();
        for broken in
            description.violations(request.method(), &request.path(), body.as_ref(), Some(request.operation_id()))
        {
            report.push(format!("{}: {broken}\n    body: {}", label(request), body.clone().unwrap_or_default()));
        }
    }
    assert!(report.is_empty(), "{} violation(s) of {API_DESCRIPTION}:\n{}", report.len(), report.join("\n"));
}

/// The requests the driver sends to boot one VM, with and without a network interface.
fn driver_requests() -> Vec<ApiRequest> {
    use banger_server::{
        domain::{Image, ImageId, VmPaths, VmSpec},
        host::vmm::{GuestNic, LaunchSpec, firecracker::FirecrackerVmm},
    };
    let image = Image {
        id: ImageId::generate(),
        name: "img".into(),
        kernel_path: "/images/vmlinux".into(),
        initrd_path: Some("/images/initrd.img".into()),
        rootfs_path: "/images/rootfs.ext4".into(),
        kernel_args: "quiet".into(),
        rootfs_size_bytes: 1,
        created_at_ms: 0,
        labels: Default::default(),
        origin: None,
    };
    let paths = VmPaths::new(std::path::Path::new("/state/vms/x"));
    let nic = GuestNic {
        tap: "bgtap3".into(),
        mac: "02:42:00:00:00:03".into(),
        address: "172.30.0.2/24".into(),
        gateway: "172.30.0.1".into(),
        nameserver: Some("172.30.0.1".into()),
    };
    [None, Some(&nic)]
        .into_iter()
        .flat_map(|nic| {
            let launch = LaunchSpec {
                id: banger_server::domain::VmId::generate(),
                name: "web",
                paths: &paths,
                spec: VmSpec { vcpus: 2, memory_mib: 512, disk_bytes: 0 },
                image: &image,
                vsock_cid: 3,
                disk: &paths.root_disk,
                disk_format: "raw",
                nic,
                memory: banger_server::host::vmm::GuestMemory::Anonymous,
                restore_from: None,
                extra_groups: &[],
            };
            FirecrackerVmm::configuration(&launch, false)
        })
        .collect()
}

#[test]
#[cfg_attr(not(firecracker_api), ignore = "SKIPPED: no Firecracker API description (set BANGER_FIRECRACKER_API)")]
fn the_requests_the_driver_boots_a_vm_with_conform() {
    let description = ApiDescription::load();
    let requests = driver_requests();
    assert!(requests.iter().any(|r| r.path() == "/actions"), "the boot ends with InstanceStart");
    let mut report = Vec::new();
    for request in &requests {
        let body = request.body();
        for broken in
            description.violations(request.method(), &request.path(), body.as_ref(), Some(request.operation_id()))
        {
            report.push(format!("{}: {broken}\n    body: {}", label(request), body.clone().unwrap_or_default()));
        }
    }
    assert!(report.is_empty(), "{} violation(s) of {API_DESCRIPTION}:\n{}", report.len(), report.join("\n"));
}

/// Runs the validator on one hand-made request.
fn rules_broken(method: &str, path: &str, body: Option<Value>) -> Vec<(Rule, String)> {
    ApiDescription::load()
        .violations(method, path, body.as_ref(), None)
        .into_iter()
        .map(|violation| (violation.rule, violation.at))
        .collect()
}

fn broken(rule: Rule, at: &str) -> Vec<(Rule, String)> {
    vec![(rule, at.to_owned())]
}

#[test]
#[cfg_attr(not(firecracker_api), ignore = "SKIPPED: no Firecracker API description (set BANGER_FIRECRACKER_API)")]
fn the_validator_catches_paths_methods_and_missing_or_unexpected_bodies() {
    let drive = json!({"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false});
    assert_eq!(rules_broken("PUT", "/drives/rootfs", Some(drive.clone())), vec![]);
    assert_eq!(rules_broken("PUT", "/drive/rootfs", Some(drive.clone())), broken(Rule::UnknownPath, "path"));
    assert_eq!(rules_broken("PUT", "/drives/", Some(drive.clone())), broken(Rule::UnknownPath, "path"));
    assert_eq!(rules_broken("DELETE", "/drives/rootfs", Some(drive.clone())), broken(Rule::UndeclaredMethod, "method"));
    assert_eq!(rules_broken("PUT", "/drives/other", Some(drive)), broken(Rule::PathBodyMismatch, "body.drive_id"));
    assert_eq!(rules_broken("PUT", "/actions", None), broken(Rule::MissingBody, "body"));
    assert_eq!(rules_broken("GET", "/vm/config", Some(json!({}))), broken(Rule::UnexpectedBody, "body"));

    let description = ApiDescription::load();
    let wrong_id = description.violations("GET", "/", None, Some("getExportVmConfig"));
    assert_eq!(wrong_id.iter().map(|violation| violation.rule).collect::<Vec<_>>(), vec![Rule::OperationId]);
}

#[test]
#[cfg_attr(not(firecracker_api), ignore = "SKIPPED: no Firecracker API description (set BANGER_FIRECRACKER_API)")]
fn the_validator_catches_bad_bodies() {
    assert_eq!(
        rules_broken("PUT", "/drives/rootfs", Some(json!({"drive_id": "rootfs", "path_on_host": "/r"}))),
        broken(Rule::Required, "body.is_root_device")
    );
    assert_eq!(
        rules_broken(
            "PUT",
            "/drives/rootfs",
            Some(json!({"drive_id": "rootfs", "is_root_device": true, "cache_mode": "Unsafe"}))
        ),
        broken(Rule::UnknownProperty, "body.cache_mode")
    );
    assert_eq!(
        rules_broken("PUT", "/machine-config", Some(json!({"vcpu_count": "2", "mem_size_mib": 128}))),
        broken(Rule::WrongType, "body.vcpu_count")
    );
    assert_eq!(
        rules_broken("PUT", "/machine-config", Some(json!({"vcpu_count": 0, "mem_size_mib": 128}))),
        broken(Rule::OutOfRange, "body.vcpu_count")
    );
    assert_eq!(
        rules_broken("PUT", "/vsock", Some(json!({"guest_cid": 2, "uds_path": "/v"}))),
        broken(Rule::OutOfRange, "body.guest_cid")
    );
    assert_eq!(
        rules_broken("PUT", "/actions", Some(json!({"action_type": "Reboot"}))),
        broken(Rule::NotInEnum, "body.action_type")
    );
    assert_eq!(
        rules_broken("PUT", "/logger", Some(json!({"log_path": "/l", "show_level": "yes"}))),
        broken(Rule::WrongType, "body.show_level")
    );
    assert_eq!(rules_broken("PUT", "/metrics", Some(json!([]))), broken(Rule::WrongType, "body"));
}

#[test]
#[cfg_attr(not(firecracker_api), ignore = "SKIPPED: no Firecracker API description (set BANGER_FIRECRACKER_API)")]
fn the_validator_follows_refs_through_several_levels() {
    // MachineConfiguration.cpu_template -> CpuTemplate, a string enum rather than an object.
    assert_eq!(
        rules_broken(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "Z9"}))
        ),
        broken(Rule::NotInEnum, "body.cpu_template")
    );
    // Drive.rate_limiter -> RateLimiter.bandwidth -> TokenBucket: two hops below the body's own.
    let drive = json!({
        "drive_id": "rootfs",
        "is_root_device": true,
        "rate_limiter": {"bandwidth": {"size": "lots", "one_time_burst": 1}},
    });
    let mut rules = rules_broken("PUT", "/drives/rootfs", Some(drive));
    rules.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        rules,
        vec![
            (Rule::Required, "body.rate_limiter.bandwidth.refill_time".to_owned()),
            (Rule::WrongType, "body.rate_limiter.bandwidth.size".to_owned()),
        ]
    );
}

/// Mutation self-check: every example's body, broken one field at a time, must be reported, so
/// the conformance test above cannot pass by looking at the wrong schema or none.
#[test]
#[cfg_attr(not(firecracker_api), ignore = "SKIPPED: no Firecracker API description (set BANGER_FIRECRACKER_API)")]
fn every_example_broken_one_field_at_a_time_is_reported() {
    let description = ApiDescription::load();
    let mut unnoticed = Vec::new();
    for request in ApiRequest::all_examples() {
        let Some(Value::Object(body)) = request.body() else { continue };
        let (method, path) = (request.method(), request.path());
        let mut mutants: Vec<(String, Map<String, Value>)> = Vec::new();
        let mut extra = body.clone();
        extra.insert("banger_unknown_field".into(), json!(true));
        mutants.push(("an unknown field".into(), extra));
        for (field, value) in &body {
            let mut retyped = body.clone();
            let wrong = if value.is_string() { json!(1) } else { json!("not-the-declared-type") };
            retyped.insert(field.clone(), wrong);
            mutants.push((format!("{field} of the wrong type"), retyped));
        }
        let operation =
            description.template_for(&path).and_then(|(_, operations)| operations.get(&method.to_ascii_lowercase()));
        let schema = operation
            .and_then(|operation| operation.get("parameters"))
            .and_then(Value::as_array)
            .and_then(|parameters| parameters.iter().find_map(|parameter| parameter.get("schema")))
            .unwrap_or_else(|| panic!("{} declares a body schema", label(&request)));
        let (schema, _) = description.resolve(schema).expect("body schema resolves");
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let required = required.as_str().unwrap_or_default();
            let mut without = body.clone();
            if without.remove(required).is_some() {
                mutants.push((format!("required {required} removed"), without));
            }
        }
        for (mutation, mutant) in mutants {
            if description.violations(method, &path, Some(&Value::Object(mutant)), None).is_empty() {
                unnoticed.push(format!("{} with {mutation}", label(&request)));
            }
        }
    }
    assert!(unnoticed.is_empty(), "the validator missed:\n{}", unnoticed.join("\n"));
}
