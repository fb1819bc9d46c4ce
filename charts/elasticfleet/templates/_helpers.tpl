{{/*
Names and labels shared by every template, and the one place that decides
where the adapter store is (the chart's Valkey, an external Redis, or none).
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "elasticfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: release-chart, or the release alone when
it already holds the chart's name. At most 45 characters: the Valkey
StatefulSet (<fullname>-valkey) labels its pods with its name plus an
11-character revision hash, and a label value holds 63.
*/}}
{{- define "elasticfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := include "elasticfleet.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The recommended labels of every object. */}}
{{- define "elasticfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "elasticfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The labels that select one component's pods (operator, valkey). */}}
{{- define "elasticfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "elasticfleet.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "elasticfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "elasticfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference; an empty tag means the chart's appVersion. */}}
{{- define "elasticfleet.image" -}}
{{- printf "%s:%s" .image.repository (default .context.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "elasticfleet.peeringName" -}}
{{- default (include "elasticfleet.fullname" .) .Values.peering.name }}
{{- end }}

{{- define "elasticfleet.valkeyName" -}}
{{- printf "%s-valkey" (include "elasticfleet.fullname" .) }}
{{- end }}

{{/*
The adapter store's URL: the chart's Valkey (by its Service's name in the
release's namespace, which resolves from every namespace), else redis.url;
empty when there is neither.
*/}}
{{- define "elasticfleet.storeUrl" -}}
{{- if .Values.valkey.enabled }}
{{- if .Values.redis.url }}
{{- fail "redis.url names an external Redis: set valkey.enabled=false with it" }}
{{- end }}
{{- printf "redis://%s.%s.svc:6379/0" (include "elasticfleet.valkeyName" .) .Release.Namespace }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* The Secret holding the store's password; empty when it has none. */}}
{{- define "elasticfleet.storeSecret" -}}
{{- if .Values.valkey.enabled }}
{{- include "elasticfleet.valkeyName" . }}
{{- else if .Values.redis.url }}
{{- .Values.redis.existingSecret }}
{{- end }}
{{- end }}

{{- define "elasticfleet.storeSecretKey" -}}
{{- if .Values.valkey.enabled }}password{{ else }}{{ .Values.redis.existingSecretPasswordKey }}{{ end }}
{{- end }}

{{/*
The pod and container security contexts of every pod the chart creates, the
same as the operator gives worker pods (operator/build.py): the restricted
Pod Security Standard, as the images' non-root user, read-only root.
*/}}
{{- define "elasticfleet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "elasticfleet.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end }}
