using System.Windows;

namespace WpfLabelClient
{
    /// <summary>
    /// WpfLabelClient.exe [--relay ws://127.0.0.1:8080] [--backend http://127.0.0.1:8090] [--client-id cml]
    /// </summary>
    public partial class App : Application
    {
        protected override void OnStartup(StartupEventArgs e)
        {
            base.OnStartup(e);
            var settings = new Settings();
            for (int i = 0; i + 1 < e.Args.Length; i += 2)
            {
                switch (e.Args[i])
                {
                    case "--relay": settings.RelayUrl = e.Args[i + 1]; break;
                    case "--backend": settings.BackendUrl = e.Args[i + 1].TrimEnd('/'); break;
                    case "--client-id": settings.ClientId = e.Args[i + 1]; break;
                }
            }
            var window = new MainWindow(settings);
            MainWindow = window;
            window.Show();
        }
    }

    public sealed class Settings
    {
        public string RelayUrl = "ws://127.0.0.1:8080";     // a node, or the load balancer
        public string BackendUrl = "http://127.0.0.1:8090"; // examples/label_service
        public string ClientId = "cml";                      // the BizId labels are published to
    }
}
