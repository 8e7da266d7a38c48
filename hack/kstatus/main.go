// Command kstatus prints the kstatus verdict (Current, InProgress, Failed,
// ...) for the Kubernetes object read as JSON or YAML from stdin, using the
// same library Flux and kpt use. Output: "<status>: <message>".
package main

import (
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

func main() {
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: read stdin:", err)
		os.Exit(2)
	}
	// Through JSON, so integers stay int64 as kstatus expects.
	data, err := yaml.YAMLToJSON(input)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: parse object:", err)
		os.Exit(2)
	}
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(data); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: decode object:", err)
		os.Exit(2)
	}
	result, err := status.Compute(obj)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: compute status:", err)
		os.Exit(2)
	}
	fmt.Printf("%s: %s\n", result.Status, result.Message)
}
