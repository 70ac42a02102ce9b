{{/* Names. */}}
{{- define "rm-abstract.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rm-abstract.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rm-abstract.operator.fullname" -}}{{ include "rm-abstract.fullname" . }}-operator{{- end -}}
{{- define "rm-abstract.devicePlugin.fullname" -}}{{ include "rm-abstract.fullname" . }}-device-plugin{{- end -}}
{{- define "rm-abstract.agent.fullname" -}}{{ include "rm-abstract.fullname" . }}-agent{{- end -}}
{{- define "rm-abstract.webhook.service" -}}{{ include "rm-abstract.fullname" . }}-webhook{{- end -}}
{{- define "rm-abstract.webhook.configName" -}}{{ include "rm-abstract.fullname" . }}-webhook{{- end -}}
{{- define "rm-abstract.leaseName" -}}{{ .Values.operator.leaseName | default (include "rm-abstract.operator.fullname" .) }}{{- end -}}

{{/* Secret of the webhook's serving certificate. */}}
{{- define "rm-abstract.webhook.secretName" -}}
{{- if .Values.webhook.certificate.secretName -}}
{{- .Values.webhook.certificate.secretName -}}
{{- else if eq .Values.webhook.certificate.mode "provided" -}}
{{- fail "webhook.certificate.mode=provided needs webhook.certificate.secretName (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt)" -}}
{{- else -}}
{{- include "rm-abstract.fullname" . }}-webhook-tls
{{- end -}}
{{- end -}}

{{/* Labels common to every object (the instance label comes with the selector labels). */}}
{{- define "rm-abstract.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rm-abstract
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of a component; app.kubernetes.io/name is the binary's name
     (kubectl inference cache finds the agents by app.kubernetes.io/name=rm-agent). */}}
{{- define "rm-abstract.selectorLabels" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "rm-abstract.componentLabels" -}}
{{ include "rm-abstract.labels" .root }}
{{ include "rm-abstract.selectorLabels" . }}
app.kubernetes.io/component: {{ .componentRole }}
{{- end -}}

{{/* image: repository:tag, the tag defaulting to appVersion. */}}
{{- define "rm-abstract.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/* Device types and aliases, as in crds/src/device.rs. */}}
{{- define "rm-abstract.checkType" -}}
{{- $known := list "rbln" "atom" "rebellions" "furiosa" "rngd" "gpu" "cuda" "nvidia" "cpu" -}}
{{- if not (has (lower .type) $known) -}}
{{- fail (printf "%s: unknown device type %q (known: rbln, furiosa, gpu, cpu and aliases atom, rebellions, rngd, cuda, nvidia)" .where .type) -}}
{{- end -}}
{{- end -}}

{{/* The operator's --config file (FileConfig in operator/src/config.rs). */}}
{{- define "rm-abstract.operatorConfig" -}}
{{- range $t, $p := .Values.priorities }}{{ include "rm-abstract.checkType" (dict "type" $t "where" "priorities") }}{{ end -}}
{{- range $t, $r := .Values.resourceNames }}{{ if not (has $t (list "rbln" "furiosa" "gpu")) }}{{ fail (printf "resourceNames: key %q must be rbln, furiosa or gpu (cpu has no resource)" $t) }}{{ end }}{{ end -}}
priorities:
{{- range $t, $p := .Values.priorities }}
  {{ $t }}: {{ int64 $p }}
{{- end }}
resourceNames:
{{- range $t, $r := .Values.resourceNames }}
  {{ $t }}: {{ $r | quote }}
{{- end }}
cpuFallback: {{ .Values.cpuFallback }}
unschedulableGracePeriod: {{ .Values.unschedulableGracePeriod | quote }}
{{- end -}}

{{/* The device plugin's --config file (FileConfig in device-plugin/src/config.rs). */}}
{{- define "rm-abstract.devicePluginConfig" -}}
hostRoot: /host
kubeletDir: /var/lib/kubelet/device-plugins
stateDir: /var/lib/rm-abstract/device-plugin
podResourcesSocket: /var/lib/kubelet/pod-resources/kubelet.sock
agentSocketDir: {{ .Values.hostPaths.socketDir | quote }}
{{- if .Values.webhook.agentResource }}
agentResource: {{ .Values.webhook.agentResource | quote }}
agentSlots: {{ int64 .Values.devicePlugin.agentSlots }}
{{- else }}
agentSlots: 0
{{- end }}
replicas: {{ int64 .Values.devicePlugin.replicas }}
healthIntervalMs: {{ int64 .Values.devicePlugin.healthIntervalMs }}
cdiEnabled: {{ .Values.devicePlugin.cdiEnabled }}
vendors:
{{- $enabled := .Values.devicePlugin.vendors }}
{{- range $t := list "rbln" "furiosa" "gpu" }}
  {{ $t }}:
    enabled: {{ or (empty $enabled) (has $t $enabled) }}
    {{- with (get $.Values.resourceNames $t) }}
    resourceName: {{ . | quote }}
    {{- end }}
{{- end }}
{{- end -}}
