{{/*
Naming, labels and the values every template shares.
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "apipool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: fullnameOverride, else the release name
(when it already contains the chart's name), else <release>-<chart>. Kept to 40
characters so that suffixes such as "-framework" still fit in 63.
*/}}
{{- define "apipool.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "apipool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods (add app.kubernetes.io/component). */}}
{{- define "apipool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "apipool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "apipool.labels" -}}
helm.sh/chart: {{ include "apipool.chart" . }}
{{ include "apipool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: apipool
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "apipool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "apipool.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The apipool image (operator, slots of the example pool, worker, test). */}}
{{- define "apipool.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The namespaces the operator watches, as a list (empty: all namespaces). */}}
{{- define "apipool.watchNamespaces" -}}
{{- if .Values.operator.watchAllNamespaces }}
{{- list | toJson }}
{{- else if .Values.operator.watchNamespaces }}
{{- .Values.operator.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the Redis URL ("" when there is none). */}}
{{- define "apipool.redisSecretName" -}}
{{- if .Values.redis.internal.enabled }}
{{- printf "%s-redis" (include "apipool.fullname" .) }}
{{- else }}
{{- .Values.redis.existingSecret }}
{{- end }}
{{- end }}

{{/* Key of the Redis URL in that Secret. */}}
{{- define "apipool.redisSecretKey" -}}
{{- if .Values.redis.internal.enabled }}url{{ else }}{{ .Values.redis.existingSecretKey }}{{ end }}
{{- end }}

{{/* Fails the render when something needs Redis and no Redis is configured. */}}
{{- define "apipool.requireRedis" -}}
{{- if and .Values.redis.internal.enabled .Values.redis.existingSecret }}
{{- fail "redis.internal.enabled and redis.existingSecret are mutually exclusive: use the in-chart Redis or the URL in your own Secret, not both" }}
{{- end }}
{{- if not (include "apipool.redisSecretName" .) }}
{{- fail "pool.enabled and worker.enabled need Redis: set redis.existingSecret (a Secret whose key redis.existingSecretKey holds the URL) or redis.internal.enabled=true" }}
{{- end }}
{{- end }}

{{/* The pool the worker submits to. */}}
{{- define "apipool.workerPool" -}}
{{- default .Values.pool.name .Values.worker.pool }}
{{- end }}

{{/* Hardened container securityContext shared by the apipool containers. */}}
{{- define "apipool.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Hardened pod securityContext of the apipool pods (uid 10001 of the image). */}}
{{- define "apipool.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The operator's rules in a watched namespace (framework events + application). */}}
{{- define "apipool.applicationRules" -}}
# kopf posts Events about pools, always as new objects.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# The pools: list/watch, re-read, patch (kopf's finalizer and annotations).
- apiGroups: [apipool.dev]
  resources: [apiconcurrencypools]
  verbs: [get, list, watch, patch]
# The status subresource (slots, queue depth, utilization, conditions).
- apiGroups: [apipool.dev]
  resources: [apiconcurrencypools/status]
  verbs: [get, patch]
# Slot pods: observed, created when missing, deleted when surplus or out of
# date; patched only to remove their own slot-exit finalizer once the process
# is known gone.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete, patch]
# The Secret named in spec.redis.secretRef, read by name only (no list/watch).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
