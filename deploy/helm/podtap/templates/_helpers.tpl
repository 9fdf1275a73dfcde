{{/* Names, labels and the rendered podtap configuration. */}}

{{- define "podtap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "podtap.fullname" -}}
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

{{- define "podtap.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "podtap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podtap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "podtap.labels" -}}
helm.sh/chart: {{ include "podtap.chart" . }}
{{ include "podtap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "podtap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "podtap.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "podtap.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "podtap.telemetryPort" -}}
{{- dig "telemetry" "port" 2020 (.Values.config | default dict) -}}
{{- end -}}

{{/* The directory of the sinks' disk buffers, "" when persistence is off. */}}
{{- define "podtap.bufferDir" -}}
{{- if .Values.persistence.hostPath.enabled -}}/var/lib/podtap/buffer{{- end -}}
{{- end -}}

{{/*
The credentials of the sink conveniences: env var name -> secret reference, for the
sinks that are on and the secrets that are named.
*/}}
{{- define "podtap.secretEnv" -}}
{{- $out := dict -}}
{{- with .Values.elasticsearch -}}
{{- if .enabled -}}
{{- if .auth.passwordSecret.name }}{{ $_ := set $out "ES_PASSWORD" .auth.passwordSecret }}{{ end -}}
{{- if .auth.apiKeySecret.name }}{{ $_ := set $out "ES_API_KEY" .auth.apiKeySecret }}{{ end -}}
{{- end -}}
{{- end -}}
{{- with .Values.loki -}}
{{- if .enabled -}}
{{- if .auth.passwordSecret.name }}{{ $_ := set $out "LOKI_PASSWORD" .auth.passwordSecret }}{{ end -}}
{{- if .auth.bearerTokenSecret.name }}{{ $_ := set $out "LOKI_TOKEN" .auth.bearerTokenSecret }}{{ end -}}
{{- end -}}
{{- end -}}
{{- with .Values.otlp -}}
{{- if .enabled -}}
{{- if .auth.bearerTokenSecret.name }}{{ $_ := set $out "OTLP_TOKEN" .auth.bearerTokenSecret }}{{ end -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* TLS of one convenience sink: {ca_file, insecure_skip_verify} as podtap's TlsConfig. */}}
{{- define "podtap.sinkTls" -}}
{{- $tls := dict -}}
{{- if .tls.caSecret.name -}}
{{- $_ := set $tls "ca_file" (printf "/etc/podtap/tls/%s/ca.crt" .name) -}}
{{- end -}}
{{- if .tls.insecureSkipVerify -}}
{{- $_ := set $tls "insecure_skip_verify" true -}}
{{- end -}}
{{- toYaml $tls -}}
{{- end -}}

{{/* The sinks the conveniences make, as podtap's `sinks` mapping. */}}
{{- define "podtap.convenienceSinks" -}}
{{- $sinks := dict -}}
{{- $buffer := include "podtap.bufferDir" . -}}
{{- with .Values.elasticsearch -}}
{{- if .enabled -}}
{{- $s := dict "kind" "elasticsearch" "url" .url "elasticsearch" (dict "index" .index "data_stream" .dataStream) -}}
{{- $auth := dict -}}
{{- if .auth.username }}{{ $_ := set $auth "username" .auth.username }}{{ end -}}
{{- if .auth.passwordSecret.name }}{{ $_ := set $auth "password_env" "ES_PASSWORD" }}{{ end -}}
{{- if .auth.apiKeySecret.name }}{{ $_ := set $auth "api_key_env" "ES_API_KEY" }}{{ end -}}
{{- if $auth }}{{ $_ := set $s "auth" $auth }}{{ end -}}
{{- $tls := include "podtap.sinkTls" (dict "name" "elasticsearch" "tls" .tls) | fromYaml -}}
{{- if $tls }}{{ $_ := set $s "tls" $tls }}{{ end -}}
{{- if $buffer }}{{ $_ := set $s "buffer" (dict "disk_dir" $buffer) }}{{ end -}}
{{- $_ := set $sinks "elasticsearch" $s -}}
{{- end -}}
{{- end -}}
{{- with .Values.loki -}}
{{- if .enabled -}}
{{- $s := dict "kind" "loki" "url" .url -}}
{{- if .tenant }}{{ $_ := set $s "loki" (dict "tenant" .tenant) }}{{ end -}}
{{- $auth := dict -}}
{{- if .auth.username }}{{ $_ := set $auth "username" .auth.username }}{{ end -}}
{{- if .auth.passwordSecret.name }}{{ $_ := set $auth "password_env" "LOKI_PASSWORD" }}{{ end -}}
{{- if .auth.bearerTokenSecret.name }}{{ $_ := set $auth "token_env" "LOKI_TOKEN" }}{{ end -}}
{{- if $auth }}{{ $_ := set $s "auth" $auth }}{{ end -}}
{{- $tls := include "podtap.sinkTls" (dict "name" "loki" "tls" .tls) | fromYaml -}}
{{- if $tls }}{{ $_ := set $s "tls" $tls }}{{ end -}}
{{- if $buffer }}{{ $_ := set $s "buffer" (dict "disk_dir" $buffer) }}{{ end -}}
{{- $_ := set $sinks "loki" $s -}}
{{- end -}}
{{- end -}}
{{- with .Values.otlp -}}
{{- if .enabled -}}
{{- $s := dict "kind" "otlp" "url" .url -}}
{{- if .headers }}{{ $_ := set $s "headers" .headers }}{{ end -}}
{{- if .auth.bearerTokenSecret.name }}{{ $_ := set $s "auth" (dict "token_env" "OTLP_TOKEN") }}{{ end -}}
{{- $tls := include "podtap.sinkTls" (dict "name" "otlp" "tls" .tls) | fromYaml -}}
{{- if $tls }}{{ $_ := set $s "tls" $tls }}{{ end -}}
{{- if $buffer }}{{ $_ := set $s "buffer" (dict "disk_dir" $buffer) }}{{ end -}}
{{- $_ := set $sinks "otlp" $s -}}
{{- end -}}
{{- end -}}
{{- toYaml $sinks -}}
{{- end -}}

{{/* podtap.yaml: `config` with the conveniences' sinks under config.sinks. */}}
{{- define "podtap.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $sinks := include "podtap.convenienceSinks" . | fromYaml -}}
{{- $own := deepCopy (get $cfg "sinks" | default dict) -}}
{{- $sinks = mergeOverwrite $sinks $own -}}
{{- if not $sinks -}}
{{- $sinks = dict "stdout" (dict "kind" "stdout") -}}
{{- end -}}
{{- $_ := set $cfg "sinks" $sinks -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The TLS CA secrets of the conveniences: sink name -> secret reference. */}}
{{- define "podtap.tlsSecrets" -}}
{{- $out := dict -}}
{{- range $name := list "elasticsearch" "loki" "otlp" -}}
{{- $s := get $.Values $name -}}
{{- if and $s.enabled $s.tls.caSecret.name -}}
{{- $_ := set $out $name $s.tls.caSecret -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{- define "podtap.records" -}}
{{- dig "records" dict (.Values.config | default dict) | toYaml -}}
{{- end -}}

{{/* The node's filesystems both containers need (check and run). */}}
{{- define "podtap.hostMounts" -}}
- name: cgroup
  mountPath: /sys/fs/cgroup
  readOnly: true
- name: tracing
  mountPath: /sys/kernel/tracing
- name: debugfs
  mountPath: /sys/kernel/debug
- name: btf
  mountPath: /sys/kernel/btf
  readOnly: true
{{- if .Values.hostKernelHeaders }}
- name: modules
  mountPath: /lib/modules
  readOnly: true
- name: usr-src
  mountPath: /usr/src
  readOnly: true
{{- end }}
- name: header-cache
  mountPath: /var/cache/podtap
- name: tmp
  mountPath: /tmp
{{- end -}}
