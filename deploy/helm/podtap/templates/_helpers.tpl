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
The Secret keys each convenience sink reads, as files: sink -> list of {name, key, path}.
They are mounted at /etc/podtap/secrets/<sink>/<path> (files, not environment variables:
a rotated token is picked up without a restart, and nothing shows in `kubectl describe`).
*/}}
{{- define "podtap.sinkSecrets" -}}
{{- $out := dict -}}
{{- range $sink := list "elasticsearch" "loki" "otlp" -}}
{{- $v := get $.Values $sink -}}
{{- if $v.enabled -}}
{{- $files := list -}}
{{- $auth := $v.auth | default dict -}}
{{- range $field, $path := dict "passwordSecret" "password" "bearerTokenSecret" "token" "apiKeySecret" "api_key" -}}
{{- $ref := get $auth $field -}}
{{- if and $ref $ref.name -}}
{{- $files = append $files (dict "name" $ref.name "key" $ref.key "path" $path) -}}
{{- end -}}
{{- end -}}
{{- if $v.tls.caSecret.name -}}
{{- $files = append $files (dict "name" $v.tls.caSecret.name "key" $v.tls.caSecret.key "path" "ca.crt") -}}
{{- end -}}
{{- if $files }}{{ $_ := set $out $sink $files }}{{ end -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The auth and tls of one convenience sink, as podtap's AuthConfig and TlsConfig. */}}
{{- define "podtap.sinkCredentials" -}}
{{- $dir := printf "/etc/podtap/secrets/%s" .sink -}}
{{- $out := dict -}}
{{- $auth := dict -}}
{{- with .values.auth -}}
{{- if .username }}{{ $_ := set $auth "username" .username }}{{ end -}}
{{- if and .passwordSecret .passwordSecret.name }}{{ $_ := set $auth "password_file" (printf "%s/password" $dir) }}{{ end -}}
{{- if and .bearerTokenSecret .bearerTokenSecret.name }}{{ $_ := set $auth "token_file" (printf "%s/token" $dir) }}{{ end -}}
{{- if and .apiKeySecret .apiKeySecret.name }}{{ $_ := set $auth "api_key_file" (printf "%s/api_key" $dir) }}{{ end -}}
{{- end -}}
{{- if $auth }}{{ $_ := set $out "auth" $auth }}{{ end -}}
{{- $tls := dict -}}
{{- if .values.tls.caSecret.name }}{{ $_ := set $tls "ca_file" (printf "%s/ca.crt" $dir) }}{{ end -}}
{{- if .values.tls.insecureSkipVerify }}{{ $_ := set $tls "insecure_skip_verify" true }}{{ end -}}
{{- if $tls }}{{ $_ := set $out "tls" $tls }}{{ end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The sinks the conveniences make, as podtap's `sinks` mapping. */}}
{{- define "podtap.convenienceSinks" -}}
{{- $sinks := dict -}}
{{- $buffer := include "podtap.bufferDir" . -}}
{{- range $name := list "elasticsearch" "loki" "otlp" -}}
{{- $v := get $.Values $name -}}
{{- if $v.enabled -}}
{{- $s := dict "kind" $name "url" $v.url -}}
{{- if eq $name "elasticsearch" -}}
{{- $_ := set $s "elasticsearch" (dict "index" $v.index "data_stream" $v.dataStream) -}}
{{- end -}}
{{- if and (eq $name "loki") $v.tenant -}}
{{- $_ := set $s "loki" (dict "tenant" $v.tenant) -}}
{{- end -}}
{{- if and (eq $name "otlp") $v.headers -}}
{{- $_ := set $s "headers" $v.headers -}}
{{- end -}}
{{- $s = merge $s (include "podtap.sinkCredentials" (dict "sink" $name "values" $v) | fromYaml) -}}
{{- if $buffer }}{{ $_ := set $s "buffer" (dict "disk_dir" $buffer) }}{{ end -}}
{{- $_ := set $sinks $name $s -}}
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
{{- /* The agents' own pods are never captured: select them by the chart's name label. */ -}}
{{- $kube := deepCopy (get $cfg "kube" | default dict) -}}
{{- if not (hasKey $kube "agent_pod_selector") -}}
{{- $_ := set $kube "agent_pod_selector" (printf "app.kubernetes.io/name=%s" (include "podtap.name" .)) -}}
{{- end -}}
{{- $_ := set $cfg "kube" $kube -}}
{{- toYaml $cfg -}}
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
