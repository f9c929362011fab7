{{/* Names */}}
{{- define "llama-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llama-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llama-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The GPU Deployment: <fullname> in combined mode (it serves clients), <fullname>-engine in split. */}}
{{- define "llama-gateway.engineName" -}}
{{- if eq .Values.mode "combined" }}
{{- include "llama-gateway.fullname" . }}
{{- else }}
{{- printf "%s-engine" (include "llama-gateway.fullname" .) }}
{{- end }}
{{- end }}

{{- define "llama-gateway.gatewayName" -}}
{{- printf "%s-gateway" (include "llama-gateway.fullname" .) }}
{{- end }}

{{- define "llama-gateway.redisName" -}}
{{- printf "%s-redis" (include "llama-gateway.fullname" .) }}
{{- end }}

{{/* The component of the GPU pods: server (combined) or engine (split). */}}
{{- define "llama-gateway.engineComponent" -}}
{{- ternary "server" "engine" (eq .Values.mode "combined") }}
{{- end }}

{{/* The component that clients reach through the main Service. */}}
{{- define "llama-gateway.frontComponent" -}}
{{- ternary "server" "gateway" (eq .Values.mode "combined") }}
{{- end }}

{{/* Labels: call with (dict "root" $ "component" "gateway"). */}}
{{- define "llama-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llama-gateway.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "llama-gateway.labels" -}}
helm.sh/chart: {{ include "llama-gateway.chart" .root }}
{{ include "llama-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: llama-gateway
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llama-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llama-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: call with an image dict {repository, tag, digest}. */}}
{{- define "llama-gateway.image" -}}
{{- if .digest }}
{{- printf "%s:%s@%s" .repository .tag .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* Secrets: the app Secret's name and key names. */}}
{{- define "llama-gateway.secretName" -}}
{{- default (include "llama-gateway.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "llama-gateway.secretKey" -}}
{{- if .root.Values.secrets.existingSecret }}
{{- index .root.Values.secrets .key }}
{{- else }}
{{- get (dict "adminTokenKey" "admin-token" "keySecretKey" "key-secret" "bootstrapKeyKey" "bootstrap-key") .key }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the Redis password; empty name: no password. */}}
{{- define "llama-gateway.redisPasswordSecret" -}}
{{- $r := .Values.redis }}
{{- if eq $r.mode "bundled" }}
{{- if $r.bundled.auth.enabled }}
{{- default (include "llama-gateway.redisName" .) $r.bundled.auth.existingSecret }}
{{- end }}
{{- else }}
{{- $r.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "llama-gateway.redisPasswordKey" -}}
{{- $r := .Values.redis }}
{{- if eq $r.mode "bundled" }}
{{- ternary $r.bundled.auth.existingSecretPasswordKey "redis-password" (ne $r.bundled.auth.existingSecret "") }}
{{- else }}
{{- $r.external.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{/*
GATEWAY_REDIS_URL. The password never appears here: Kubernetes substitutes $(REDIS_PASSWORD),
an env var read from the Secret and declared before GATEWAY_REDIS_URL.
*/}}
{{- define "llama-gateway.redisUrl" -}}
{{- $r := .Values.redis }}
{{- $hasPassword := ne (include "llama-gateway.redisPasswordSecret" .) "" }}
{{- if eq $r.mode "bundled" }}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" $hasPassword }}
{{- printf "redis://%s%s:6379/0" $auth (include "llama-gateway.redisName" .) }}
{{- else }}
{{- $ext := $r.external }}
{{- $auth := "" }}
{{- if $hasPassword }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $ext.username }}
{{- else if $ext.username }}
{{- $auth = printf "%s@" $ext.username }}
{{- end }}
{{- if $ext.url }}
{{- $u := urlParse $ext.url }}
{{- printf "%s://%s%s%s" $u.scheme $auth $u.host $u.path }}
{{- with $u.query }}?{{ . }}{{ end }}
{{- else if $ext.host }}
{{- printf "%s://%s%s:%v/%v" (ternary "rediss" "redis" $ext.tls) $auth $ext.host (int64 $ext.port) (int64 $ext.db) }}
{{- else }}
{{- fail "redis.mode=external needs redis.external.url or redis.external.host" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The routes file content (split and upstream). */}}
{{- define "llama-gateway.routes" -}}
{{- if .Values.routes.config }}
{{- toYaml .Values.routes.config }}
{{- else if eq .Values.mode "split" }}
{{- $engine := printf "http://%s.%s.svc:8000/v1" (include "llama-gateway.engineName" .) .Release.Namespace }}
{{- toYaml (dict "routes" (list (dict "model" .Values.model.id "api_base" $engine "api_key_env" "GATEWAY_BOOTSTRAP_KEY"))) }}
{{- else }}
{{- fail "mode=upstream needs routes.config: the routes file naming the upstream engines" }}
{{- end }}
{{- end }}

{{/*
Checksums that roll pods on change. The routes file and the env values are hashed directly.
Generated secrets are never regenerated, so their identity (name and keys) is enough; an
existing Secret is hashed with its live data when `lookup` can see it (helm install/upgrade),
so rotating it and running `helm upgrade` rolls the pods. The policy ConfigMap is deliberately
not hashed: policy edits are hot-reloaded without a restart.
*/}}
{{- define "llama-gateway.configChecksum" -}}
{{- $routes := "" }}
{{- if ne .Values.mode "combined" }}
{{- $routes = include "llama-gateway.routes" . }}
{{- end }}
{{- list $routes .Values.config .Values.redis.mode .Values.redis.external .Values.model | toJson | sha256sum }}
{{- end }}

{{- define "llama-gateway.secretsChecksum" -}}
{{- $parts := list (include "llama-gateway.secretName" .) .Values.secrets }}
{{- with .Values.secrets.existingSecret }}
{{- $parts = append $parts ((lookup "v1" "Secret" $.Release.Namespace .).data | default dict) }}
{{- end }}
{{- $redisSecret := include "llama-gateway.redisPasswordSecret" . }}
{{- $parts = append $parts $redisSecret }}
{{- if and $redisSecret (or .Values.redis.external.existingSecret .Values.redis.bundled.auth.existingSecret) }}
{{- $parts = append $parts ((lookup "v1" "Secret" .Release.Namespace $redisSecret).data | default dict) }}
{{- end }}
{{- $parts | toJson | sha256sum }}
{{- end }}

{{/* terminationGracePeriodSeconds: the preStop pause + the drain + a margin. */}}
{{- define "llama-gateway.terminationGrace" -}}
{{- $t := .Values.termination }}
{{- $pause := ternary 0 (int $t.preStopSeconds) (eq $t.preStop "none") }}
{{- add $pause (int .Values.config.shutdownGraceSeconds) (int $t.extraGraceSeconds) }}
{{- end }}

{{- define "llama-gateway.lifecycle" -}}
{{- $t := .Values.termination }}
{{- if eq $t.preStop "sleep" }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ $t.preStopSeconds }}
{{- else if eq $t.preStop "exec" }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ $t.preStopSeconds }}"]
{{- end }}
{{- end }}

{{/*
The env of a gateway container. Call with (dict "root" $ "role" "server|engine|gateway").
server: the gateway with the local engine (combined); engine: the same behind the CPU gateway
(split); gateway: the CPU gateway in front of engines (split, upstream).
An entry of config.extraEnv or <component>.extraEnv replaces the chart's entry of that name
(no duplicate names: server-side apply refuses them).
*/}}
{{- define "llama-gateway.env" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $gpu := ne .role "gateway" }}
{{- $secret := include "llama-gateway.secretName" $root }}
{{- $env := list }}
{{- $env = append $env (dict "name" "GATEWAY_HOST" "value" "0.0.0.0") }}
{{- $env = append $env (dict "name" "GATEWAY_PORT" "value" "8000") }}
{{- $env = append $env (dict "name" "GATEWAY_MODEL_ID" "value" $v.model.id) }}
{{- $env = append $env (dict "name" "GATEWAY_DEVICE" "value" (ternary "cuda" "cpu" $gpu)) }}
{{- if $gpu }}
{{- $modelPath := trimSuffix "/" (printf "%s/%s" (trimSuffix "/" $v.model.mountPath) $v.model.dir) }}
{{- $env = append $env (dict "name" "GATEWAY_MODEL_PATH" "value" $modelPath) }}
{{- $env = append $env (dict "name" "GATEWAY_MAX_BATCH_SIZE" "value" (toString (int64 $v.config.maxBatchSize))) }}
{{- else }}
{{- $env = append $env (dict "name" "GATEWAY_ROUTES_FILE" "value" "/etc/llama-gateway/routes/routes.yaml") }}
{{- end }}
{{- $env = append $env (dict "name" "GATEWAY_STATE_DIR" "value" "/var/lib/llama-gateway") }}
{{- $env = append $env (dict "name" "GATEWAY_POLICY_DIR" "value" $v.policies.mountPath) }}
{{- $env = append $env (dict "name" "GATEWAY_DEFAULT_POLICY" "value" $v.config.defaultPolicy) }}
{{- $env = append $env (dict "name" "GATEWAY_LOG_LEVEL" "value" $v.config.logLevel) }}
{{- $env = append $env (dict "name" "GATEWAY_SHUTDOWN_GRACE_S" "value" (toString (int64 $v.config.shutdownGraceSeconds))) }}
{{- $env = append $env (dict "name" "GATEWAY_IMAGE_FETCH_ALLOW" "value" (toJson $v.config.imageFetchAllow)) }}
{{- $env = append $env (dict "name" "GATEWAY_AUDIT_ENABLED" "value" (toString $v.config.audit.enabled)) }}
{{- $env = append $env (dict "name" "GATEWAY_AUDIT_MAX_ENTRIES" "value" (toString (int64 $v.config.audit.maxEntries))) }}
{{- $env = append $env (dict "name" "GATEWAY_AUDIT_MAX_AGE_S" "value" (toString (int64 $v.config.audit.maxAgeSeconds))) }}
{{- range $key, $name := dict "defaultRpm" "GATEWAY_DEFAULT_RPM" "defaultTpm" "GATEWAY_DEFAULT_TPM" "defaultMaxConcurrency" "GATEWAY_DEFAULT_MAX_CONCURRENCY" }}
{{- with index $v.config $key }}
{{- $env = append $env (dict "name" $name "value" (toString (int64 .))) }}
{{- end }}
{{- end }}
{{- with $v.config.promptGuardPath }}
{{- $env = append $env (dict "name" "GATEWAY_PROMPT_GUARD_PATH" "value" .) }}
{{- end }}
{{- with $v.config.llamaGuardPath }}
{{- $env = append $env (dict "name" "GATEWAY_LLAMA_GUARD_PATH" "value" .) }}
{{- end }}
{{- $env = append $env (dict "name" "GATEWAY_REDIS_FAILURE_MODE" "value" $v.redis.failureMode) }}
{{- $redisSecret := include "llama-gateway.redisPasswordSecret" $root }}
{{- if $redisSecret }}
{{- $ref := dict "name" $redisSecret "key" (include "llama-gateway.redisPasswordKey" $root) }}
{{- $env = append $env (dict "name" "REDIS_PASSWORD" "valueFrom" (dict "secretKeyRef" $ref)) }}
{{- end }}
{{- $env = append $env (dict "name" "GATEWAY_REDIS_URL" "value" (include "llama-gateway.redisUrl" $root)) }}
{{- range $name, $key := dict "GATEWAY_ADMIN_TOKEN" "adminTokenKey" "GATEWAY_KEY_SECRET" "keySecretKey" "GATEWAY_BOOTSTRAP_KEY" "bootstrapKeyKey" }}
{{- $ref := dict "name" $secret "key" (include "llama-gateway.secretKey" (dict "root" $root "key" $key)) }}
{{- $env = append $env (dict "name" $name "valueFrom" (dict "secretKeyRef" $ref)) }}
{{- end }}
{{- $env = append $env (dict "name" "HOME" "value" "/tmp") }}
{{- $env = append $env (dict "name" "XDG_CACHE_HOME" "value" "/tmp/.cache") }}
{{- $env = append $env (dict "name" "HF_HUB_OFFLINE" "value" "1") }}
{{- $env = append $env (dict "name" "TRANSFORMERS_OFFLINE" "value" "1") }}
{{- /* Overrides: config.extraEnv (NAME: value), then the component's EnvVar list. */}}
{{- $extra := list }}
{{- range $name, $value := $v.config.extraEnv }}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
{{- $value = int64 $value }}
{{- end }}
{{- $extra = append $extra (dict "name" $name "value" (toString $value)) }}
{{- end }}
{{- $extra = concat $extra (ternary $v.engine.extraEnv $v.gateway.extraEnv $gpu) }}
{{- $replaced := dict }}
{{- range $extra }}
{{- $_ := set $replaced .name true }}
{{- end }}
{{- $out := list }}
{{- range $env }}
{{- if not (hasKey $replaced .name) }}
{{- $out = append $out . }}
{{- end }}
{{- end }}
{{- $seen := dict }}
{{- $last := dict }}
{{- range $extra }}
{{- $_ := set $last .name . }}
{{- end }}
{{- range $extra }}
{{- if not (hasKey $seen .name) }}
{{- $_ := set $seen .name true }}
{{- $out = append $out (get $last .name) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Probes on the http port. Call with (dict "startup" {...} "readiness" {...} "liveness" {...}). */}}
{{- define "llama-gateway.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml .startup | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  {{- toYaml .readiness | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml .liveness | nindent 2 }}
{{- end }}

{{/* Mounts every gateway container has: /tmp, the state dir, the policies (no subPath). */}}
{{- define "llama-gateway.commonMounts" -}}
- name: tmp
  mountPath: /tmp
- name: state
  mountPath: /var/lib/llama-gateway
- name: policies
  mountPath: {{ .Values.policies.mountPath }}
  readOnly: true
{{- end }}

{{- define "llama-gateway.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmp }}
- name: state
  emptyDir:
    sizeLimit: {{ .state }}
- name: policies
  configMap:
    name: {{ printf "%s-policies" (include "llama-gateway.fullname" .root) }}
{{- end }}
