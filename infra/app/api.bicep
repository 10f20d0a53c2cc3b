// The Flex Consumption Function App (azd service "api"), as in the Azure-Samples eventgrid-blob quickstarts'
// app module: AVM web/site with a user-assigned identity and the deployment container reached with it.
@description('Name of the Function App.')
param name string

@description('Region of the Function App.')
param location string = resourceGroup().location

@description('Tags; the module adds azd-service-name.')
param tags object = {}

@description('Name of the azd service this app hosts (azure.yaml).')
param serviceName string = 'api'

@description('Application Insights component the app reports to (local auth disabled).')
param applicationInsightsName string

@description('Resource id of the Flex Consumption plan.')
param appServicePlanId string

@description('The app\'s own settings (main.bicep); the connection and monitoring settings below are added to them.')
param appSettings object

@allowed([
  'python'
])
@description('Functions worker runtime.')
param runtimeName string

@allowed([
  '3.11'
])
@description('Python version (azure-functions 1.x on 3.11; requirements.txt is built remotely).')
param runtimeVersion string

@description('Storage account for the host, the deployment package and the data connection.')
param storageAccountName string

@description('Blob container holding the deployment package.')
param deploymentStorageContainerName string

@allowed([
  512
  2048
  4096
])
@description('Memory of one instance (MB).')
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(1000)
@description('Upper bound of instances.')
param maximumInstanceCount int = 100

@description('Resource id of the user-assigned identity.')
param identityId string

@description('Client id of the user-assigned identity.')
param identityClientId string

resource stg 'Microsoft.Storage/storageAccounts@2022-09-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// Identity-based connections (no keys): the host's AzureWebJobsStorage and the triggers' DataStorage
// (shared.settings.STORAGE_CONNECTION), read by the host, the blob SDK-type binding and
// shared.settings.storage_connection_values.
var identitySettings = {
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AzureWebJobsStorage__blobServiceUri: stg.properties.primaryEndpoints.blob
  AzureWebJobsStorage__queueServiceUri: stg.properties.primaryEndpoints.queue
  AzureWebJobsStorage__tableServiceUri: stg.properties.primaryEndpoints.table
  DataStorage__credential: 'managedidentity'
  DataStorage__clientId: identityClientId
  DataStorage__blobServiceUri: stg.properties.primaryEndpoints.blob
  DataStorage__queueServiceUri: stg.properties.primaryEndpoints.queue
  DataStorage__tableServiceUri: stg.properties.primaryEndpoints.table
  AZURE_CLIENT_ID: identityClientId
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
}

module api 'br/public:avm/res/web/site:0.15.1' = {
  name: '${serviceName}-flex-consumption'
  params: {
    kind: 'functionapp,linux'
    name: name
    location: location
    tags: union(tags, {
      'azd-service-name': serviceName
    })
    serverFarmResourceId: appServicePlanId
    managedIdentities: {
      systemAssigned: false
      userAssignedResourceIds: [
        identityId
      ]
    }
    // Key Vault references (PROXY_API_KEYS) resolve with the user-assigned identity.
    keyVaultAccessIdentityResourceId: identityId
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${stg.properties.primaryEndpoints.blob}${deploymentStorageContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: runtimeName
        version: runtimeVersion
      }
    }
    siteConfig: {
      alwaysOn: false
    }
    appSettingsKeyValuePairs: union(appSettings, identitySettings)
  }
}

output SERVICE_API_NAME string = api.outputs.name
output SERVICE_API_URI string = 'https://${api.outputs.defaultHostname}'
