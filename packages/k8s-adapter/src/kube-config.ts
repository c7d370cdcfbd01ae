/** Where the operator finds its cluster: a kubeconfig file, else $KUBECONFIG/~/.kube/config or in-cluster. */
import { KubeConfig } from "@kubernetes/client-node";

export function kubeConfigFrom(file?: string): KubeConfig {
  const config = new KubeConfig();
  if (file === undefined) config.loadFromDefault();
  else config.loadFromFile(file);
  return config;
}
