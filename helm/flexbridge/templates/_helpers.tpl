{{/* The chart name. */}}
{{- define "flexbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name, at most 63 characters (a DNS label). */}}
{{- define "flexbridge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "flexbridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels (app.kubernetes.io/*). */}}
{{- define "flexbridge.labels" -}}
helm.sh/chart: {{ include "flexbridge.chart" . }}
{{ include "flexbridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flexbridge
{{- end -}}

{{- define "flexbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flexbridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "flexbridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "flexbridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "flexbridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The port of a `host:port` listen address ("0.0.0.0:8080", "[::]:8080"). */}}
{{- define "flexbridge.port" -}}
{{- $port := splitList ":" (toString .) | last -}}
{{- if not (regexMatch "^[0-9]+$" $port) -}}
{{- fail (printf "cannot read the port of listen address %q: use host:port" (toString .)) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{- define "flexbridge.ingressPort" -}}
{{- include "flexbridge.port" (((.Values.config).ingress).listen | default "127.0.0.1:8080") -}}
{{- end -}}

{{- define "flexbridge.adminPort" -}}
{{- include "flexbridge.port" (((.Values.config).admin).listen | default "127.0.0.1:9090") -}}
{{- end -}}

{{/* Whole seconds of a humantime duration: 500ms, 5s, 2m, 1h, or "2m 30s" (rounded up). */}}
{{- define "flexbridge.seconds" -}}
{{- $total := 0 -}}
{{- range $part := splitList " " (toString .) -}}
{{- if eq $part "" -}}
{{- else if hasSuffix "ms" $part -}}
{{- $total = add $total (div (add (trimSuffix "ms" $part | atoi) 999) 1000) -}}
{{- else if hasSuffix "s" $part -}}
{{- $total = add $total (trimSuffix "s" $part | atoi) -}}
{{- else if hasSuffix "m" $part -}}
{{- $total = add $total (mul (trimSuffix "m" $part | atoi) 60) -}}
{{- else if hasSuffix "h" $part -}}
{{- $total = add $total (mul (trimSuffix "h" $part | atoi) 3600) -}}
{{- else -}}
{{- fail (printf "cannot read the duration %q: use e.g. 500ms, 20s, 2m" (toString $part)) -}}
{{- end -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{- define "flexbridge.spoolMode" -}}
{{- if eq (((.Values.config).delivery).mode | default "confirm") "spool" -}}true{{- end -}}
{{- end -}}

{{/* Long enough for the daemon's own shutdown: readiness delay, in-flight requests, the
     spool's drain (spool mode) and the sinks' drain, plus a margin. */}}
{{- define "flexbridge.terminationGracePeriod" -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- $shutdown := (.Values.config).shutdown | default dict -}}
{{- $readiness := include "flexbridge.seconds" ($shutdown.readiness_delay | default "0s") | atoi -}}
{{- $grace := include "flexbridge.seconds" ($shutdown.grace_period | default "20s") | atoi -}}
{{- $drain := include "flexbridge.seconds" ($shutdown.drain_timeout | default "10s") | atoi -}}
{{- $drains := ternary 2 1 (eq (include "flexbridge.spoolMode" .) "true") -}}
{{- add $readiness $grace (mul $drain $drains) 5 -}}
{{- end -}}
{{- end -}}
