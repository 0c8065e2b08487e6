// Asks a Kafka cluster for its metadata, the way every client does on connect, and prints the
// nodes it answers with. `scripts/kafka` uses it to tell "a broker is up and serving" apart from
// "something listens on the port". Run with Java's single-file source launcher:
//   java -cp 'libs/*' Probe.java BOOTSTRAP TIMEOUT_MS
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.common.Node;

public class Probe {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        int timeoutMs = Integer.parseInt(args[1]);
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, timeoutMs);
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, timeoutMs);
        try (Admin admin = Admin.create(props)) {
            DescribeClusterResult cluster = admin.describeCluster();
            String id = cluster.clusterId().get(timeoutMs, TimeUnit.MILLISECONDS);
            StringBuilder nodes = new StringBuilder();
            for (Node node : cluster.nodes().get(timeoutMs, TimeUnit.MILLISECONDS)) {
                if (nodes.length() > 0) nodes.append(',');
                nodes.append(node.host()).append(':').append(node.port());
            }
            System.out.println("cluster " + id + " nodes " + nodes);
        } catch (Exception e) {
            System.err.println("no metadata from " + bootstrap + ": " + e.getMessage());
            System.exit(1);
        }
    }
}
