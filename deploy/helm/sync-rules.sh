#!/bin/sh
# Copy the single sources of truth into the chart, which can only read its own files:
#   deploy/prometheus/alerts.yaml -> deploy/helm/celery-health-exporter/files/alerts.yaml
#   grafana/*.json                -> deploy/helm/celery-health-exporter/files/dashboards/
# Run it after editing the rules or the dashboards (tests/deploy/test_helm_chart.py fails
# until the copies are byte-identical), and before `helm package`.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
files="$root/deploy/helm/celery-health-exporter/files"
mkdir -p "$files/dashboards"
if [ -f "$root/deploy/prometheus/alerts.yaml" ]; then
    cp "$root/deploy/prometheus/alerts.yaml" "$files/alerts.yaml"
else
    rm -f "$files/alerts.yaml"
fi
rm -f "$files"/dashboards/*.json
for f in "$root"/grafana/*.json; do
    [ -e "$f" ] && cp "$f" "$files/dashboards/"
done
echo "synced: $(ls "$files" "$files/dashboards" | grep -c -e '\.yaml$' -e '\.json$') file(s) into $files"
