// Checks the Grafana dashboards in dashboards/*.json and the PromQL of the Prometheus rules:
//
//  1. Each dashboard validates against a JSON schema of Grafana's dashboard model, generated from the
//     TypeScript types of the pinned @grafana/schema package (interface `Dashboard`), and the options
//     of each panel against its panel type's `Options` / `FieldConfig` types. Properties the model
//     does not know are errors (typos).
//  2. Import: `__inputs` offers a Prometheus data source input DS_PROMETHEUS; the `datasource`
//     template variable defaults to it.
//  3. Every panel and every query uses the data source `${datasource}`; panel ids are unique and
//     panels do not overlap; uids are stable slugs; schemaVersion >= 39; every `$variable` used is
//     defined.
//  4. Every expression parses (Prometheus' own Lezer grammar), and references only the exporter's
//     metrics (the Metrics table of the contract), Prometheus' `up`, or recording rules defined in
//     alerts/genai-task-exporter.rules.yml. Every raw metric in a dashboard is aggregated
//     (`sum by`, `max by`, `sum without (instance, pod)`, ...), so replicas and shards add up.
//  5. Every panel named in README.md (in *italics*) exists.
//
// Usage: node check.mjs REPO_ROOT
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { createGenerator } from "ts-json-schema-generator";
import Ajv from "ajv";
import YAML from "yaml";
import { parser } from "@prometheus-io/lezer-promql";

const root = path.resolve(process.argv[2] ?? "../..");
const require = createRequire(import.meta.url);
const schemaPkg = path.dirname(require.resolve("@grafana/schema/package.json"));

// The exporter's metrics (the contract's Metrics table). Histograms also expose _bucket/_sum/_count.
const CONTRACT_METRICS = [
  "genai_tasks",
  "genai_task_completions_total",
  "genai_task_failures_total",
  "genai_task_credits_used_total",
  "genai_task_credits_refunded_total",
  "genai_task_oldest_in_flight_seconds",
  "genai_task_discovered_total",
  "genai_task_dropped_total",
  "genai_upstream_requests_total",
  "genai_upstream_errors_total",
  "genai_upstream_backoff_seconds",
  "genai_account_credits",
  "genai_exporter_provider_up",
  "genai_exporter_last_poll_success_timestamp_seconds",
  "genai_exporter_build_info",
  "genai_exporter_config_last_reload_successful",
  "genai_exporter_config_last_reload_success_timestamp_seconds",
  "genai_exporter_shard_info",
  "genai_exporter_store_up",
  "genai_exporter_store_errors_total",
  "genai_proxy_requests_total",
  "genai_proxy_submit_rejections_total",
];
const CONTRACT_HISTOGRAMS = [
  "genai_task_completion_latency_seconds",
  "genai_upstream_request_duration_seconds",
  "genai_task_detection_delay_seconds",
  "genai_proxy_request_duration_seconds",
];
// The standard process collector.
const PROCESS_METRICS = [
  "process_cpu_seconds_total",
  "process_open_fds",
  "process_max_fds",
  "process_virtual_memory_bytes",
  "process_resident_memory_bytes",
  "process_start_time_seconds",
  "process_threads",
];
// Written by Prometheus itself for every target.
const PROMETHEUS_METRICS = ["up"];
// Series a user adds to the rule file (README.md, "Stuck-task threshold"); none ship.
const USER_RULES = ["provider:genai_task_stuck_threshold_override:seconds"];

// Panel types the dashboards may use, and where their option types live in @grafana/schema.
const PANEL_TYPES = {
  timeseries: { options: "Options", fieldConfig: "FieldConfig" },
  stat: { options: "Options" },
  heatmap: { options: "Options", fieldConfig: "FieldConfig" },
  bargauge: { options: "Options" },
  table: { options: "Options", fieldConfig: "FieldConfig" },
};
const GRAFANA_VARIABLES = new Set(["__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"]);

const problems = [];
const problem = (where, msg) => problems.push(`${where}: ${msg}`);

// --- schemas from @grafana/schema ------------------------------------------------------------
function schemaFor(relFile, type) {
  const file = path.join(schemaPkg, "dist/types", relFile);
  return createGenerator({ path: file, type, skipTypeCheck: true, additionalProperties: false, topRef: true }).createSchema(type);
}
const ajv = new Ajv({ allErrors: true, strict: false });
const validateDashboard = ajv.compile(schemaFor("raw/dashboard/x/types.gen.d.ts", "Dashboard"));
const panelValidators = {};
for (const [type, parts] of Object.entries(PANEL_TYPES)) {
  panelValidators[type] = {};
  for (const [part, tsType] of Object.entries(parts)) {
    panelValidators[type][part] = ajv.compile(schemaFor(`raw/composable/${type}/panelcfg/x/types.gen.d.ts`, tsType));
  }
}
const importSchema = {
  type: "object",
  properties: {
    __inputs: {
      type: "array",
      items: {
        type: "object",
        required: ["name", "label", "type", "pluginId"],
        properties: {
          name: { type: "string" }, label: { type: "string" }, description: { type: "string" },
          type: { enum: ["datasource", "constant"] }, pluginId: { type: "string" }, pluginName: { type: "string" },
          value: { type: "string" },
        },
        additionalProperties: false,
      },
    },
    __requires: {
      type: "array",
      items: {
        type: "object",
        required: ["type", "id", "name", "version"],
        properties: {
          type: { enum: ["grafana", "datasource", "panel"] }, id: { type: "string" },
          name: { type: "string" }, version: { type: "string" },
        },
        additionalProperties: false,
      },
    },
    __elements: { type: "object" },
  },
  required: ["__inputs"],
};
const validateImport = ajv.compile(importSchema);
const ajvErrors = (errors) => (errors ?? []).map((e) => `${e.instancePath || "/"} ${e.message}${e.params?.additionalProperty ? ` (${e.params.additionalProperty})` : ""}`);

// --- PromQL -----------------------------------------------------------------------------------
// Returns {names: [metric names], unaggregated: [raw selectors outside any aggregation], error}.
function analyse(expr) {
  const tree = parser.parse(expr);
  const names = [];
  const unaggregated = [];
  let error = null;
  const cursor = tree.cursor();
  const walk = (aggregated) => {
    do {
      const node = cursor.node;
      if (node.type.isError) error ??= `syntax error at ${node.from}: ${JSON.stringify(expr.slice(Math.max(0, node.from - 20), node.to + 20))}`;
      if (node.name === "VectorSelector") {
        const id = node.getChild("Identifier");
        if (id) {
          const name = expr.slice(id.from, id.to);
          names.push(name);
          if (!aggregated) unaggregated.push(name);
        } else {
          error ??= "selector without a metric name";
        }
      }
      if (cursor.firstChild()) {
        walk(aggregated || node.name === "AggregateExpr");
        cursor.parent();
      }
    } while (cursor.nextSibling());
  };
  walk(false);
  return { names, unaggregated, error };
}

// Grafana variables become values PromQL accepts, as Grafana itself would substitute them.
const substitute = (expr) =>
  expr
    .replaceAll("$__rate_interval", "1m")
    .replaceAll("$__interval", "15s")
    .replaceAll("$__range", "1h")
    .replace(/\$\{?([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}?/g, ".*");

// --- rules ------------------------------------------------------------------------------------
const rulesFile = path.join(root, "alerts/genai-task-exporter.rules.yml");
const rules = YAML.parse(fs.readFileSync(rulesFile, "utf8"));
const recorded = new Set();
const ruleExprs = [];
for (const group of rules.groups) {
  for (const rule of group.rules) {
    if (rule.record) {
      recorded.add(rule.record);
      if (!/^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$/.test(rule.record)) problem(`rule ${rule.record}`, "record name is not level:metric:operations");
    }
    ruleExprs.push({ where: `rule ${rule.record ?? rule.alert}`, expr: String(rule.expr) });
  }
}
const known = new Set([...CONTRACT_METRICS, ...PROCESS_METRICS, ...PROMETHEUS_METRICS, ...USER_RULES, ...recorded]);
for (const h of CONTRACT_HISTOGRAMS) for (const suffix of ["_bucket", "_sum", "_count"]) known.add(h + suffix);

function checkExpr(where, expr, { requireAggregation }) {
  const { names, unaggregated, error } = analyse(expr);
  if (error) problem(where, `${error} in ${expr}`);
  for (const name of names) if (!known.has(name)) problem(where, `unknown metric ${name} (not in the contract, not a recording rule)`);
  if (requireAggregation) {
    for (const name of unaggregated) {
      if (!recorded.has(name)) problem(where, `${name} is not aggregated (sum by / max by / ... without (instance, pod))`);
    }
  }
}
for (const { where, expr } of ruleExprs) checkExpr(where, expr, { requireAggregation: false });

// --- dashboards -------------------------------------------------------------------------------
const DS = { type: "prometheus", uid: "${datasource}" };
const sameDs = (ds) => ds && ds.type === DS.type && ds.uid === DS.uid;
const dashboardDir = path.join(root, "dashboards");
const files = fs.readdirSync(dashboardDir).filter((f) => f.endsWith(".json")).sort();
if (files.length === 0) problem("dashboards", "no dashboard found");
const uids = new Map();
const titles = new Set();
let panelCount = 0;
let exprCount = 0;

for (const file of files) {
  const where = `dashboards/${file}`;
  let dash;
  try {
    dash = JSON.parse(fs.readFileSync(path.join(dashboardDir, file), "utf8"));
  } catch (e) {
    problem(where, `not JSON: ${e.message}`);
    continue;
  }

  // 1. import metadata, then the dashboard model itself
  if (!validateImport(dash)) for (const e of ajvErrors(validateImport.errors)) problem(where, `import metadata ${e}`);
  const input = (dash.__inputs ?? []).find((i) => i.name === "DS_PROMETHEUS");
  if (!input || input.type !== "datasource" || input.pluginId !== "prometheus") problem(where, "no __inputs entry DS_PROMETHEUS of type datasource, pluginId prometheus");
  const model = { ...dash };
  delete model.__inputs;
  delete model.__requires;
  delete model.__elements;
  if (!validateDashboard(model)) for (const e of ajvErrors(validateDashboard.errors)) problem(where, `dashboard model ${e}`);

  // 2. identity
  if (!(dash.schemaVersion >= 39)) problem(where, `schemaVersion ${dash.schemaVersion} < 39`);
  if (typeof dash.uid !== "string" || !/^[a-z0-9-]{1,40}$/.test(dash.uid)) problem(where, `uid ${JSON.stringify(dash.uid)} is not a stable slug`);
  else if (uids.has(dash.uid)) problem(where, `uid ${dash.uid} also used by ${uids.get(dash.uid)}`);
  else uids.set(dash.uid, file);
  if (dash.id !== null && dash.id !== undefined) problem(where, "id must be null (Grafana assigns it)");

  // 3. variables
  const vars = dash.templating?.list ?? [];
  const varNames = new Set(vars.map((v) => v.name));
  const dsVar = vars.find((v) => v.name === "datasource");
  if (!dsVar || dsVar.type !== "datasource" || dsVar.query !== "prometheus") problem(where, "no datasource variable `datasource` of query prometheus");
  else if (dsVar.current?.value !== "${DS_PROMETHEUS}") problem(where, "variable datasource does not default to ${DS_PROMETHEUS}");
  for (const v of vars) {
    if (v.type !== "query") continue;
    if (!sameDs(v.datasource)) problem(where, `variable ${v.name} does not use data source \${datasource}`);
    const q = typeof v.query === "string" ? v.query : v.query?.query;
    if (!/^label_values\(.+\)$/.test(q ?? "")) problem(where, `variable ${v.name}: query ${JSON.stringify(q)} is not label_values(...)`);
    else checkExpr(`${where} variable ${v.name}`, substitute(q.replace(/^label_values\((.*),\s*\w+\)$/, "$1")), { requireAggregation: false });
    if (!v.multi || !v.includeAll || v.allValue !== ".*") problem(where, `variable ${v.name} must be multi-value with All = .*`);
  }
  const usedVars = (text) => [...text.matchAll(/\$\{?([A-Za-z_][A-Za-z0-9_]*)/g)].map((m) => m[1]);
  for (const v of vars) {
    const q = typeof v.query === "string" ? v.query : v.query?.query ?? "";
    for (const u of usedVars(q)) if (!varNames.has(u) && !GRAFANA_VARIABLES.has(u)) problem(where, `variable ${v.name} uses undefined $${u}`);
  }

  // 4. panels
  const top = dash.panels ?? [];
  const all = [];
  for (const p of top) {
    all.push(p);
    if (p.type === "row") for (const inner of p.panels ?? []) all.push(inner);
  }
  const ids = new Map();
  for (const p of all) {
    const pw = `${where} panel ${JSON.stringify(p.title ?? p.id)}`;
    if (typeof p.id !== "number") problem(pw, "no numeric id");
    else if (ids.has(p.id)) problem(pw, `id ${p.id} also used by ${JSON.stringify(ids.get(p.id))}`);
    else ids.set(p.id, p.title);
    if (!p.title) problem(pw, "no title");
    else titles.add(p.title);
    const g = p.gridPos;
    if (!g) problem(pw, "no gridPos");
    else if (g.x < 0 || g.w < 1 || g.x + g.w > 24 || g.h < 1 || g.y < 0) problem(pw, `gridPos ${JSON.stringify(g)} outside the 24-column grid`);
    if (p.type === "row") continue;
    panelCount++;
    if (!PANEL_TYPES[p.type]) {
      problem(pw, `panel type ${p.type} is not one of ${Object.keys(PANEL_TYPES).join(", ")}`);
      continue;
    }
    const validators = panelValidators[p.type];
    if (!validators.options(p.options ?? {})) for (const e of ajvErrors(validators.options.errors)) problem(pw, `options${e}`);
    if (validators.fieldConfig && p.fieldConfig?.defaults?.custom !== undefined && !validators.fieldConfig(p.fieldConfig.defaults.custom)) {
      for (const e of ajvErrors(validators.fieldConfig.errors)) problem(pw, `fieldConfig.defaults.custom${e}`);
    }
    if (!sameDs(p.datasource)) problem(pw, `data source ${JSON.stringify(p.datasource)} is not \${datasource}`);
    if (!p.description) problem(pw, "no description");
    const targets = p.targets ?? [];
    if (targets.length === 0) problem(pw, "no query");
    const refIds = new Set();
    for (const t of targets) {
      const tw = `${pw} query ${t.refId}`;
      if (!t.refId || refIds.has(t.refId)) problem(tw, "missing or duplicate refId");
      refIds.add(t.refId);
      if (!sameDs(t.datasource)) problem(tw, `data source ${JSON.stringify(t.datasource)} is not \${datasource}`);
      if (typeof t.expr !== "string" || t.expr.trim() === "") {
        problem(tw, "no expr");
        continue;
      }
      for (const u of usedVars(t.expr)) if (!varNames.has(u) && !GRAFANA_VARIABLES.has(u)) problem(tw, `uses undefined $${u}`);
      // regex-friendly filters: a multi-value variable only with =~
      for (const m of t.expr.matchAll(/(!?=~?)\s*"\$\{?([A-Za-z_]\w*)/g)) {
        const v = vars.find((x) => x.name === m[2]);
        if (v?.multi && m[1] !== "=~") problem(tw, `multi-value $${m[2]} used with ${m[1]} instead of =~`);
      }
      exprCount++;
      checkExpr(tw, substitute(t.expr), { requireAggregation: true });
    }
  }
  // overlap of panels on the grid (rows take their own line)
  const boxes = top.filter((p) => p.gridPos);
  for (let i = 0; i < boxes.length; i++) {
    for (let j = i + 1; j < boxes.length; j++) {
      const a = boxes[i].gridPos, b = boxes[j].gridPos;
      if (a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h) {
        problem(where, `panels ${JSON.stringify(boxes[i].title)} and ${JSON.stringify(boxes[j].title)} overlap`);
      }
    }
  }
}

// --- the runbook names panels that exist ---------------------------------------------------------
// Only the README's runbook section: from its heading to the next second-level heading.
const readme = fs.readFileSync(path.join(root, "README.md"), "utf8");
const runbookStart = readme.indexOf("\n## Runbook\n");
if (runbookStart < 0) problem("README.md", "has no '## Runbook' section");
const runbookEnd = readme.indexOf("\n## ", runbookStart + 1);
const runbook = readme
  .slice(runbookStart, runbookEnd < 0 ? undefined : runbookEnd)
  .replace(/```[\s\S]*?```/g, "")
  .replace(/`[^`\n]*`/g, "");
for (const m of runbook.matchAll(/(?<![*\w])\*([^*\n]+)\*(?![*\w])/g)) {
  if (!titles.has(m[1])) problem("README.md", `names panel *${m[1]}*, which no dashboard has`);
}

if (problems.length > 0) {
  console.error(problems.join("\n"));
  console.error(`\n${problems.length} problem(s)`);
  process.exit(1);
}
console.log(`dashboards: ${files.length} dashboards, ${panelCount} panels, ${exprCount} queries valid against @grafana/schema ${require("@grafana/schema/package.json").version}; ${ruleExprs.length} rule expressions use known metrics`);
