//! Checks that keep the contract a contract (our own small `buf lint` + `buf breaking`, which
//! cannot be installed here), over the descriptor sets:
//!
//! - **lint** of `proto/brats/v1/*.proto` as compiled into [`brats_proto::FILE_DESCRIPTOR_SET`]:
//!   package `brats.v1` in `brats/v1/`, PascalCase messages, enums and services, snake_case
//!   fields, enum values prefixed with their enum's name and a `*_UNSPECIFIED` zero, and a
//!   comment on every message, field, enum, enum value, service and method.
//! - **breaking changes** against the last released contract, `proto/released/brats-v1.binpb`
//!   (made by `scripts/release-proto.sh REV`): no message, field, enum value, service or method
//!   removed or renamed, no field number given another type or cardinality, no method's types or
//!   streaming changed. Wire-compatible changes pass (new fields, messages, values and methods;
//!   a proto3 field made `optional`).

use std::collections::HashMap;

use prost::Message;
use prost_types::field_descriptor_proto::Label;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    ServiceDescriptorProto,
};

/// The contract's own files (the descriptor sets also hold their imports).
fn brats_files(set: &FileDescriptorSet) -> Vec<&FileDescriptorProto> {
    set.file.iter().filter(|f| f.name().starts_with("brats/")).collect()
}

fn current() -> FileDescriptorSet {
    FileDescriptorSet::decode(brats_proto::FILE_DESCRIPTOR_SET).expect("the compiled descriptor set decodes")
}

fn released() -> FileDescriptorSet {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto/released/brats-v1.binpb");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    FileDescriptorSet::decode(bytes.as_slice()).expect("the released descriptor set decodes")
}

// Field numbers inside descriptor.proto, for source-code-info paths.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn is_pascal(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

fn is_snake(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn upper_snake(pascal: &str) -> String {
    let mut out = String::new();
    for (i, c) in pascal.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Lint findings of one file, each naming the element and the rule.
struct Linter<'a> {
    comments: HashMap<Vec<i32>, bool>,
    file: &'a str,
    findings: Vec<String>,
}

impl Linter<'_> {
    fn documented(&mut self, path: &[i32], what: &str) {
        if !self.comments.get(path).copied().unwrap_or(false) {
            self.findings.push(format!("{}: {what} has no comment", self.file));
        }
    }

    fn message(&mut self, m: &DescriptorProto, path: Vec<i32>, scope: &str) {
        let name = format!("{scope}{}", m.name());
        if !is_pascal(m.name()) {
            self.findings.push(format!("{}: message {name} is not PascalCase", self.file));
        }
        self.documented(&path, &format!("message {name}"));
        for (i, f) in m.field.iter().enumerate() {
            if !is_snake(f.name()) {
                self.findings.push(format!("{}: field {name}.{} is not snake_case", self.file, f.name()));
            }
            self.documented(
                &[path.clone(), vec![MESSAGE_FIELD, i as i32]].concat(),
                &format!("field {name}.{}", f.name()),
            );
        }
        for (i, nested) in m.nested_type.iter().enumerate() {
            if nested.options.as_ref().is_some_and(|o| o.map_entry()) {
                continue; // map<K, V> entries are generated
            }
            self.message(nested, [path.clone(), vec![MESSAGE_NESTED, i as i32]].concat(), &format!("{name}."));
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            self.enumeration(e, [path.clone(), vec![MESSAGE_ENUM, i as i32]].concat(), &format!("{name}."));
        }
    }

    fn enumeration(&mut self, e: &EnumDescriptorProto, path: Vec<i32>, scope: &str) {
        let name = format!("{scope}{}", e.name());
        if !is_pascal(e.name()) {
            self.findings.push(format!("{}: enum {name} is not PascalCase", self.file));
        }
        self.documented(&path, &format!("enum {name}"));
        let prefix = format!("{}_", upper_snake(e.name()));
        for (i, v) in e.value.iter().enumerate() {
            if !v.name().starts_with(&prefix) {
                self.findings.push(format!("{}: enum value {} is not prefixed {prefix}", self.file, v.name()));
            }
            if v.number() == 0 && v.name() != format!("{prefix}UNSPECIFIED") {
                self.findings.push(format!(
                    "{}: zero value of {name} is {}, not {prefix}UNSPECIFIED",
                    self.file,
                    v.name()
                ));
            }
            self.documented(&[path.clone(), vec![ENUM_VALUE, i as i32]].concat(), &format!("enum value {}", v.name()));
        }
    }

    fn service(&mut self, s: &ServiceDescriptorProto, path: Vec<i32>) {
        if !is_pascal(s.name()) {
            self.findings.push(format!("{}: service {} is not PascalCase", self.file, s.name()));
        }
        self.documented(&path, &format!("service {}", s.name()));
        for (i, m) in s.method.iter().enumerate() {
            if !is_pascal(m.name()) {
                self.findings.push(format!("{}: rpc {}.{} is not PascalCase", self.file, s.name(), m.name()));
            }
            self.documented(
                &[path.clone(), vec![SERVICE_METHOD, i as i32]].concat(),
                &format!("rpc {}.{}", s.name(), m.name()),
            );
        }
    }
}

fn lint(file: &FileDescriptorProto) -> Vec<String> {
    let info = file.source_code_info.as_ref().expect("descriptor set built with source info");
    let comments = info
        .location
        .iter()
        .map(|l| (l.path.clone(), l.leading_comments.as_deref().is_some_and(|c| !c.trim().is_empty())))
        .collect();
    let mut linter = Linter { comments, file: file.name(), findings: Vec::new() };
    if file.package() != "brats.v1" || !file.name().starts_with("brats/v1/") {
        linter.findings.push(format!("{}: package {} must be brats.v1 under brats/v1/", file.name(), file.package()));
    }
    for (i, m) in file.message_type.iter().enumerate() {
        linter.message(m, vec![FILE_MESSAGE, i as i32], "");
    }
    for (i, e) in file.enum_type.iter().enumerate() {
        linter.enumeration(e, vec![FILE_ENUM, i as i32], "");
    }
    for (i, s) in file.service.iter().enumerate() {
        linter.service(s, vec![FILE_SERVICE, i as i32]);
    }
    linter.findings
}

#[test]
fn the_contract_passes_lint() {
    let set = current();
    let files = brats_files(&set);
    assert_eq!(files.len(), 5, "common, preprocess, trainer, inference, gateway");
    let findings: Vec<String> = files.iter().flat_map(|f| lint(f)).collect();
    assert!(findings.is_empty(), "{} lint findings:\n{}", findings.len(), findings.join("\n"));
}

/// Every message, enum and service of a descriptor set by full name (`brats.v1.Job`).
#[derive(Default)]
struct Symbols<'a> {
    messages: HashMap<String, &'a DescriptorProto>,
    enums: HashMap<String, &'a EnumDescriptorProto>,
    services: HashMap<String, &'a ServiceDescriptorProto>,
}

impl<'a> Symbols<'a> {
    fn of(set: &'a FileDescriptorSet) -> Self {
        let mut symbols = Symbols::default();
        for file in brats_files(set) {
            let scope = format!("{}.", file.package());
            for m in &file.message_type {
                symbols.add_message(m, &scope);
            }
            for e in &file.enum_type {
                symbols.enums.insert(format!("{scope}{}", e.name()), e);
            }
            for s in &file.service {
                symbols.services.insert(format!("{scope}{}", s.name()), s);
            }
        }
        symbols
    }

    fn add_message(&mut self, m: &'a DescriptorProto, scope: &str) {
        let name = format!("{scope}{}", m.name());
        for nested in &m.nested_type {
            self.add_message(nested, &format!("{name}."));
        }
        for e in &m.enum_type {
            self.enums.insert(format!("{name}.{}", e.name()), e);
        }
        self.messages.insert(name, m);
    }
}

fn field_shape(f: &FieldDescriptorProto) -> (prost_types::field_descriptor_proto::Type, String, bool) {
    (f.r#type(), f.type_name().to_string(), f.label() == Label::Repeated)
}

/// What changed from `old` to `new` that breaks a client or server built against `old`.
fn breaking_changes(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
    let (old, new) = (Symbols::of(old), Symbols::of(new));
    let mut found = Vec::new();
    for (name, m) in &old.messages {
        let Some(n) = new.messages.get(name) else {
            found.push(format!("message {name} was removed"));
            continue;
        };
        for f in &m.field {
            match n.field.iter().find(|x| x.number() == f.number()) {
                None => found.push(format!("field {name}.{} (= {}) was removed", f.name(), f.number())),
                Some(x) if x.name() != f.name() => {
                    found.push(format!("field {name}.{} (= {}) was renamed {}", f.name(), f.number(), x.name()))
                }
                Some(x) if field_shape(x) != field_shape(f) => found.push(format!(
                    "field {name}.{} (= {}) changed type or cardinality: {:?} → {:?}",
                    f.name(),
                    f.number(),
                    field_shape(f),
                    field_shape(x)
                )),
                // A oneof membership change is wire-compatible only for proto3 `optional`.
                Some(x)
                    if f.oneof_index.is_some() != x.oneof_index.is_some()
                        && !x.proto3_optional()
                        && !f.proto3_optional() =>
                {
                    found.push(format!("field {name}.{} moved into or out of a oneof", f.name()))
                }
                Some(_) => {}
            }
        }
        for x in &n.field {
            let reserved = m.reserved_range.iter().any(|r| (r.start()..r.end()).contains(&x.number()));
            if reserved {
                found.push(format!("field {name}.{} reuses reserved number {}", x.name(), x.number()));
            }
        }
    }
    for (name, e) in &old.enums {
        let Some(n) = new.enums.get(name) else {
            found.push(format!("enum {name} was removed"));
            continue;
        };
        for v in &e.value {
            match n.value.iter().find(|x| x.number() == v.number()) {
                None => found.push(format!("enum value {} (= {}) was removed", v.name(), v.number())),
                Some(x) if x.name() != v.name() => {
                    found.push(format!("enum value {} (= {}) was renamed {}", v.name(), v.number(), x.name()))
                }
                Some(_) => {}
            }
        }
    }
    for (name, s) in &old.services {
        let Some(n) = new.services.get(name) else {
            found.push(format!("service {name} was removed"));
            continue;
        };
        for m in &s.method {
            match n.method.iter().find(|x| x.name() == m.name()) {
                None => found.push(format!("rpc {name}.{} was removed", m.name())),
                Some(x)
                    if (x.input_type(), x.output_type(), x.client_streaming(), x.server_streaming())
                        != (m.input_type(), m.output_type(), m.client_streaming(), m.server_streaming()) =>
                {
                    found.push(format!("rpc {name}.{} changed its request, response or streaming", m.name()))
                }
                Some(_) => {}
            }
        }
    }
    found.sort();
    found
}

#[test]
fn no_breaking_change_since_the_last_release() {
    let found = breaking_changes(&released(), &current());
    assert!(
        found.is_empty(),
        "{} breaking changes against proto/released/brats-v1.binpb (make them compatible, or cut a new \
         package version):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// The check itself finds what it must: a removed field, a renumbered type, a removed rpc.
#[test]
fn the_breaking_change_check_catches_breaks() {
    let old = released();
    let mut new = old.clone();
    let file = new.file.iter_mut().find(|f| f.name() == "brats/v1/preprocess.proto").unwrap();
    let message = file.message_type.iter_mut().find(|m| m.name() == "PreprocessCaseRequest").unwrap();
    message.field.retain(|f| f.name() != "force");
    message.field.iter_mut().find(|f| f.name() == "case_id").unwrap().r#type =
        Some(prost_types::field_descriptor_proto::Type::Bytes as i32);
    file.service[0].method.remove(0);
    let found = breaking_changes(&old, &new);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found.iter().any(|f| f.contains("PreprocessCaseRequest.force (= 9) was removed")), "{found:#?}");
    assert!(found.iter().any(|f| f.contains("PreprocessCaseRequest.case_id (= 1) changed type")), "{found:#?}");
    assert!(found.iter().any(|f| f.contains("rpc brats.v1.Preprocessor.") && f.contains("removed")), "{found:#?}");
}

/// The lint itself finds what it must: an undocumented message and a field not in snake_case.
#[test]
fn the_lint_catches_undocumented_and_misnamed_elements() {
    let mut set = current();
    let file = set.file.iter_mut().find(|f| f.name() == "brats/v1/preprocess.proto").unwrap();
    let index = file.message_type.iter().position(|m| m.name() == "PreprocessCaseRequest").unwrap();
    file.message_type[index].field[0].name = Some("CaseId".into());
    let info = file.source_code_info.as_mut().unwrap();
    for location in &mut info.location {
        if location.path == [FILE_MESSAGE, index as i32] {
            location.leading_comments = None;
        }
    }
    let findings = lint(file);
    assert_eq!(findings.len(), 2, "{findings:#?}");
    assert!(findings.iter().any(|f| f.contains("message PreprocessCaseRequest has no comment")), "{findings:#?}");
    assert!(findings.iter().any(|f| f.contains("PreprocessCaseRequest.CaseId is not snake_case")), "{findings:#?}");
}
